"""The paper (``paper/paper.md``) built from the generated tables and checked against them.

- :mod:`learnmask.paper.includes`: tables included between ``<!-- include: ... -->`` markers;
- :mod:`learnmask.paper.quotes`: quoted numbers tied to their cells (the markup);
- :mod:`learnmask.paper.regenerate`: every table rewritten from the committed results;
- :mod:`learnmask.paper.build`: ``learnmask paper`` (refresh) and ``learnmask paper --check``.
"""

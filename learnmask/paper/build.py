"""Build and check ``paper/paper.md``: the ``learnmask paper`` command.

Building refreshes the included tables (:mod:`learnmask.paper.includes`). Checking writes
nothing and lists every way the paper disagrees with its sources:

1. an include block differs from its file;
2. a generated table differs from what its own command writes from the committed results
   (:mod:`learnmask.paper.regenerate`; no training);
3. a quoted number differs from the cell or value it names, read from those regenerated tables
   (:mod:`learnmask.paper.quotes`);
4. a decimal number in the prose is neither a quote nor declared as no table's number.
"""
from __future__ import annotations

import pathlib
import tempfile

from learnmask.paper.includes import refresh_includes
from learnmask.paper.quotes import check_quotes, unmarked_numbers
from learnmask.paper.regenerate import gather, stale_tables


def build(paper: pathlib.Path) -> list[pathlib.Path]:
    """Rewrite ``paper``'s include blocks from their files; returns the files included.

    Raises:
        ValueError: a broken include marker or a missing file.
    """
    text = paper.read_text(encoding="utf-8")
    new, files = refresh_includes(text, paper.parent)
    if new != text:
        paper.write_text(new, encoding="utf-8")
    return files


def check(paper: pathlib.Path, *, root: pathlib.Path) -> list[str]:
    """Every disagreement of ``paper`` with its sources (see the module's list); [] when none.

    Args:
        paper: the paper's Markdown (``<root>/paper/paper.md``).
        root: the checkout whose ``paper/tables`` and ``paper/results`` it draws on.
    """
    text = paper.read_text(encoding="utf-8")
    problems = []
    try:
        if refresh_includes(text, paper.parent)[0] != text:
            problems.append(f"{paper}: included tables are stale; run `learnmask paper` to refresh them")
    except ValueError as error:
        problems.append(f"{paper}: {error}")
    with tempfile.TemporaryDirectory() as folder:
        regenerated = pathlib.Path(folder)
        done, stale = stale_tables(root, regenerated)
        problems += stale
        tables = gather(done, regenerated / "all")  # every regenerated file, under its committed name
        for committed in (root / "paper" / "tables").iterdir():  # (tables no command makes: as committed)
            if not (tables / committed.name).exists():
                (tables / committed.name).write_bytes(committed.read_bytes())
        quotes = check_quotes(text, tables=tables, results=root / "paper" / "results")
        problems += [f"{paper}: {line}" for line in quotes]
    problems += [f"{paper}: unmarked number {line}: quote it from its table or declare it in "
                 "<!-- numbers not from tables: ... -->" for line in unmarked_numbers(text)]
    return problems

"""Parameter masks: what a model may change while it is fine-tuned.

* :mod:`~learnmask.params.select` -- :func:`select_parameters` by transformer layer, name pattern
  (glob or ``"re:<regex>"``) or predicate.
"""

from learnmask.params.select import select_parameters

__all__ = ["select_parameters"]

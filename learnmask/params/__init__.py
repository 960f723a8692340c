"""Parameter masks: what a model may change while it is fine-tuned.

* :mod:`~learnmask.params.select` -- :func:`select_parameters` by transformer layer, name pattern
  (glob or ``"re:<regex>"``) or predicate.
* :mod:`~learnmask.params.freeze` -- :func:`freeze` (gradient cleared, out of the optimizer, norm
  statistics kept), :class:`FrozenParameters` (``unfreeze``, ``remove``), :class:`GradualUnfreezing`
  (ULMFiT, Howard & Ruder, 2018).
* :mod:`~learnmask.params.update` -- :class:`ParameterMasks`: per-element masks that hold at the
  optimizer update (bit-identical masked entries under AdamW with weight decay), for Child-Tuning
  (Xu et al., 2021) and FISH masks (Sung et al., 2021).
"""

from learnmask.params.freeze import FrozenParameters, GradualUnfreezing, freeze
from learnmask.params.select import select_parameters
from learnmask.params.update import ParameterMasks

__all__ = [
    "select_parameters",
    "freeze",
    "FrozenParameters",
    "GradualUnfreezing",
    "ParameterMasks",
]

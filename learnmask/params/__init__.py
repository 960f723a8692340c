"""Parameter masks: what a model may change while it is fine-tuned.

* :mod:`~learnmask.params.select` -- :func:`select_parameters` by transformer layer, name pattern
  (glob or ``"re:<regex>"``) or predicate.
* :mod:`~learnmask.params.freeze` -- :func:`freeze` (gradient cleared, out of the optimizer, norm
  statistics kept), :class:`FrozenParameters` (``unfreeze``, ``remove``), :class:`GradualUnfreezing`
  (ULMFiT, Howard & Ruder, 2018).
* :mod:`~learnmask.params.update` -- :class:`ParameterMasks`: per-element masks that hold at the
  optimizer update (bit-identical masked entries under AdamW with weight decay).
* :mod:`~learnmask.params.fisher`, :mod:`~learnmask.params.child_tuning`, :mod:`~learnmask.params.fish`
  -- which entries may change: :func:`empirical_fisher`, Child-Tuning-F and -D (Xu et al., 2021),
  FISH masks under a fixed budget (Sung et al., 2021); they feed :class:`ParameterMasks`.
* :mod:`~learnmask.params.weight_mask`, :mod:`~learnmask.params.diff_mask` -- learnable masks as
  parametrizations: piggyback weight masks (Mallya et al., 2018) and diff masks (Guo, Rush & Kim,
  2021); :func:`export_weights` gives plain weights for the unmodified model.
"""

from learnmask.params.child_tuning import ChildTuningF, child_tuning_d_masks
from learnmask.params.diff_mask import DiffMaskHandle, apply_diff_masks
from learnmask.params.fish import budget_from_count, fish_masks
from learnmask.params.fisher import empirical_fisher
from learnmask.params.freeze import FrozenParameters, GradualUnfreezing, freeze
from learnmask.params.persist import export_weights
from learnmask.params.select import select_parameters
from learnmask.params.update import ParameterMasks
from learnmask.params.weight_mask import WeightMaskHandle, apply_weight_masks

__all__ = [
    "select_parameters",
    "freeze",
    "FrozenParameters",
    "GradualUnfreezing",
    "ParameterMasks",
    "empirical_fisher",
    "ChildTuningF",
    "child_tuning_d_masks",
    "fish_masks",
    "budget_from_count",
    "apply_weight_masks",
    "WeightMaskHandle",
    "apply_diff_masks",
    "DiffMaskHandle",
    "export_weights",
]

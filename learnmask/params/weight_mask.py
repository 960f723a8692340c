"""Piggyback weight masks: a learned binary mask over frozen pretrained weights.

Mallya, Davis & Lazebnik (2018), "Piggyback: Adapting a Single Network to Multiple Tasks by
Learning to Mask Weights"; Zhao, Lin, Jaggi & Schütze (2020), "Masking as an Efficient
Alternative to Finetuning for Pretrained Language Models".

Each chosen weight ``w0`` (frozen) gets real-valued ``scores`` of its shape; the model uses

    w = w0 ⊙ m,   m = 1[scores >= threshold]   (forward)
    ∂L/∂scores = ∂L/∂m = w0 ⊙ ∂L/∂w            (backward: straight-through, the binarization
                                                  treated as the identity; Bengio et al. 2013)

With piggyback's defaults (scores initialised to 1e-2, threshold 5e-3) every mask entry starts
at 1, so the masked model equals the base model bit for bit at the start. Piggyback's code
binarizes with ``scores > threshold``; here ``>=`` (equal at these defaults, since no score
starts at the threshold).

Shape legend: ``(*p)`` is the shape of the masked parameter ``p``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from learnmask.params.persist import ParamMaskHandle, attach, check_loaded_shapes, resolve_parameter_names

__all__ = ["WeightMask", "WeightMaskHandle", "apply_weight_masks"]

#: Piggyback's initial score (Mallya et al. 2018): above the threshold, so every entry is kept.
DEFAULT_INIT: float = 1e-2
#: Piggyback's threshold (Mallya et al. 2018).
DEFAULT_THRESHOLD: float = 5e-3


class _Binarize(torch.autograd.Function):
    """Forward: ``1[scores >= threshold]`` in the scores' dtype; backward: identity."""

    @staticmethod
    def forward(ctx, scores: Tensor, threshold: float) -> Tensor:  # noqa: D102
        return (scores >= threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        return grad_output, None


class WeightMask(nn.Module):
    """Parametrization ``w0 -> w0 ⊙ 1[scores >= threshold]`` with straight-through scores.

    Args:
        weight: ``(*p)`` the base weight (its shape, dtype and device are taken).
        target: the weight's qualified name in its model (for error messages).
        init: initial score of every entry, finite.
        threshold: binarization threshold, finite.

    Attributes:
        scores: ``(*p)`` Parameter in the weight's dtype; entries >= ``threshold`` are kept.
        threshold: float (configuration, not saved in the state dict: rebuild with the same one).
    """

    #: learnmask.gates.param_groups puts the scores in its no-weight-decay "gates" group: decay
    #: would pull every score to 0, below the threshold, with no task signal.
    holds_gate_parameters = True

    def __init__(self, weight: Tensor, *, target: str, init: float, threshold: float) -> None:
        super().__init__()
        self.target = target
        self.threshold = threshold
        self.scores = nn.Parameter(torch.full(weight.shape, init, dtype=weight.dtype, device=weight.device))

    @property
    def numel_masked(self) -> int:
        """Entries under this mask."""
        return self.scores.numel()

    def binary_mask(self) -> Tensor:
        """``(*p)`` bool: which entries are kept now (no gradient)."""
        return self.scores.detach() >= self.threshold

    def forward(self, weight: Tensor) -> Tensor:
        """``(*p)`` ``weight * mask``, the mask 0/1 in ``weight``'s dtype, straight-through to scores."""
        return weight * _Binarize.apply(self.scores, self.threshold).to(weight.dtype)

    def plain(self, weight: Tensor) -> Tensor:
        """``(*p)`` the weight the model uses (the same expression as :meth:`forward`), no gradient."""
        with torch.no_grad():
            return self.forward(weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        check_loaded_shapes(self, state_dict, prefix, ["scores"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"target={self.target!r}, shape={tuple(self.scores.shape)}, threshold={self.threshold:g}"


class WeightMaskHandle(ParamMaskHandle):
    """Handle of :func:`apply_weight_masks`: the scores for the optimizer, the density, export, removal."""

    mask_class = WeightMask

    def mask_parameters(self) -> list[nn.Parameter]:
        """The scores of every mask, in ``names`` order: what the optimizer trains."""
        return [mask.scores for mask in self.masks().values()]

    def binary_masks(self) -> dict[str, Tensor]:
        """name -> ``(*p)`` bool, True where the entry is kept."""
        return {name: mask.binary_mask() for name, mask in self.masks().items()}

    def density(self) -> float:
        """Fraction of mask entries equal to 1 over all masked parameters, in [0, 1].

        Exact: the count of kept entries (an int) divided by :attr:`total`.
        """
        kept = sum(int(m.sum()) for m in self.binary_masks().values())
        return kept / self.total


def _check_finite(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r}")
    return float(value)


def apply_weight_masks(
    model: nn.Module,
    parameters: Iterable[str],
    *,
    init: float = DEFAULT_INIT,
    threshold: float = DEFAULT_THRESHOLD,
) -> WeightMaskHandle:
    """Put a piggyback weight mask on each named parameter of ``model`` (in place).

    Mallya, Davis & Lazebnik (2018); Zhao et al. (2020). Each parameter ``p`` gets a
    :class:`WeightMask` through ``torch.nn.utils.parametrize`` (the model's classes are not
    forked); ``p`` itself is frozen (``requires_grad=False``) and stays bit-identical however
    the model is trained, since it gets no gradient and optimizers skip it. Train the scores
    (:meth:`WeightMaskHandle.mask_parameters`), preferably without weight decay.

    Args:
        model: any module.
        parameters: qualified names from ``model.named_parameters()``, e.g. ``["0.weight"]``.
        init: initial score, finite (default 1e-2: with the default threshold, all entries kept,
            and the masked model equals the base model bit for bit).
        threshold: entries with ``score >= threshold`` are kept, finite (default 5e-3).

    Returns:
        :class:`WeightMaskHandle`.

    Raises:
        TypeError, ValueError: bad ``parameters`` (see
            :func:`learnmask.params.persist.resolve_parameter_names`), or a non-finite ``init`` or
            ``threshold``.
    """
    init = _check_finite(init, "init")
    threshold = _check_finite(threshold, "threshold")
    chosen = resolve_parameter_names(model, parameters)
    for name, owner, attr in chosen:
        attach(owner, attr, WeightMask(owner._parameters[attr], target=name, init=init, threshold=threshold))
    return WeightMaskHandle(model, [name for name, _, _ in chosen])

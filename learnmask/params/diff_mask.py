"""Diff masks: a sparse task delta over frozen pretrained weights, gated by hard-concrete gates.

Guo, Rush & Kim (2021), "Parameter-Efficient Transfer Learning with Diff Pruning". Each chosen
parameter ``w0`` (frozen) gets a trainable ``delta`` (initialised to 0) and one hard-concrete
gate per entry (Louizos, Welling & Kingma 2018); the model uses

    w = w0 + z ⊙ delta

and the paper's three stages reach an exact budget:

(a) L0 training: ``z`` is sampled in training mode; :meth:`DiffMaskHandle.expected_l0` (the
    expected number of non-zero gates, differentiable) is driven to a budget, e.g. by
    :class:`learnmask.control.LagrangianController` on ``1 - expected_density()``;
(b) :meth:`DiffMaskHandle.magnitude_cut`: keep exactly ``round(budget * total)`` entries of
    ``|z_eval ⊙ delta|`` over all masked parameters jointly (``z_eval`` the deterministic gate
    ``clamp(sigmoid(log_alpha)(ζ - γ) + γ, 0, 1)``, as learnmask evaluates its gates);
(c) :meth:`DiffMaskHandle.fix_mask`: ``delta`` becomes ``kept ⊙ z_eval ⊙ delta`` and ``z`` the
    fixed binary mask (no sampling), so fine-tuning moves only the kept entries of ``delta``.

In eval mode the gate is deterministic (``z_eval``; the fixed mask after (c)).

Defaults follow the paper's code (github.com/dguo98/DiffPruning): ``log_alpha`` initialised to
5, temperature 1, stretch (γ, ζ) = (-1.5, 1.5): P(z != 0) = sigmoid(5) ≈ 0.9933 and
``z_eval = 1`` at the start.

Shape legend: ``(*p)`` is the shape of the masked parameter ``p``; ``()`` a scalar tensor.
"""
from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from learnmask.functional import topk_mask
from learnmask.gates.hard_concrete import HardConcreteGate
from learnmask.params.persist import ParamMaskHandle, attach, check_loaded_shapes, resolve_parameter_names

__all__ = ["DiffMask", "DiffMaskHandle", "apply_diff_masks", "STAGES"]

#: Initial log_alpha of the paper's code (``--alpha_init 5``).
DEFAULT_INIT_LOG_ALPHA: float = 5.0
#: Temperature β of the paper's code (``--temp 1``).
DEFAULT_TEMPERATURE: float = 1.0
#: Stretch (γ, ζ) of the paper's code (``--concrete_lower -1.5 --concrete_upper 1.5``).
DEFAULT_STRETCH: tuple[float, float] = (-1.5, 1.5)

#: The stages (a), (b), (c), as stored in each mask's ``stage`` buffer (0, 1, 2).
STAGES: tuple[str, ...] = ("l0", "cut", "fixed")
_L0, _CUT, _FIXED = range(3)


class DiffMask(nn.Module):
    """Parametrization ``w0 -> w0 + z ⊙ delta`` with a hard-concrete gate ``z`` per entry.

    Args:
        weight: ``(*p)`` the base parameter (shape, dtype and device are taken), at least 1-d.
        target: its qualified name in its model (for error messages).
        init_log_alpha, temperature, stretch: the gate's, see
            :class:`learnmask.gates.HardConcreteGate`.

    Attributes:
        delta: ``(*p)`` Parameter in the weight's dtype, initialised to 0.
        gate: :class:`HardConcreteGate` of shape ``(*p)`` (``log_alpha`` float32).
        kept: ``(*p)`` bool buffer, the binary mask of the magnitude cut (all False before it).
        stage: ``()`` int64 buffer, index into :data:`STAGES`.
    """

    def __init__(self, weight: Tensor, *, target: str, init_log_alpha: float, temperature: float,
                 stretch: tuple[float, float]) -> None:
        super().__init__()
        self.target = target
        self.delta = nn.Parameter(torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device))
        self.gate = HardConcreteGate(tuple(weight.shape), init_log_alpha=init_log_alpha, temperature=temperature,
                                     stretch=stretch).to(weight.device)
        self.register_buffer("kept", torch.zeros(weight.shape, dtype=torch.bool, device=weight.device))
        self.register_buffer("stage", torch.tensor(_L0, device=weight.device))

    @property
    def numel_masked(self) -> int:
        """Entries under this mask."""
        return self.delta.numel()

    @property
    def fixed(self) -> bool:
        """Whether ``z`` is the fixed binary mask (stage (c))."""
        return int(self.stage) == _FIXED

    def eval_gate(self) -> Tensor:
        """``(*p)`` the deterministic z in [0, 1] in ``delta``'s dtype: the fixed mask, else ``z_eval``."""
        if self.fixed:
            return self.kept.to(self.delta.dtype)
        return self.gate.deterministic_mask().to(self.delta.dtype)

    def forward(self, weight: Tensor) -> Tensor:
        """``(*p)`` ``weight + z * delta``: z sampled in training mode (stage (a), (b)), else deterministic."""
        z = self.gate.sample() if self.training and not self.fixed else self.eval_gate()
        return weight + z.to(self.delta.dtype) * self.delta

    def plain(self, weight: Tensor) -> Tensor:
        """``(*p)`` the weight the model uses in eval mode (the expression of :meth:`forward`), no gradient."""
        with torch.no_grad():
            return weight + self.eval_gate() * self.delta

    def cut_scores(self) -> Tensor:
        """``(*p)`` ``|z_eval ⊙ delta|``, the magnitudes the cut ranks (no gradient)."""
        with torch.no_grad():
            return (self.eval_gate() * self.delta).abs()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        check_loaded_shapes(self, state_dict, prefix, ["delta", "kept"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        stage = state_dict.get(prefix + "stage")
        if isinstance(stage, Tensor):
            self.gate.log_alpha.requires_grad_(int(stage) != _FIXED)

    def extra_repr(self) -> str:
        return f"target={self.target!r}, shape={tuple(self.delta.shape)}, stage={STAGES[int(self.stage)]!r}"


class DiffMaskHandle(ParamMaskHandle):
    """Handle of :func:`apply_diff_masks`: parameters, expected L0, the cut, the fixed mask, export."""

    mask_class = DiffMask

    @property
    def stage(self) -> str:
        """``"l0"``, ``"cut"`` or ``"fixed"`` (:data:`STAGES`), the same for every mask."""
        stages = {int(mask.stage) for mask in self.masks().values()}
        if len(stages) != 1:
            raise RuntimeError(f"the diff masks are in different stages {sorted(STAGES[s] for s in stages)}; "
                               "was a state dict of another stage loaded into part of the model?")
        return STAGES[stages.pop()]

    def delta_parameters(self) -> list[nn.Parameter]:
        """Every mask's ``delta``, in ``names`` order (decay them or not, as for the weights)."""
        return [mask.delta for mask in self.masks().values()]

    def gate_parameters(self) -> list[nn.Parameter]:
        """Every gate's ``log_alpha`` (train without weight decay); empty once the mask is fixed."""
        return [] if self.stage == "fixed" else [mask.gate.log_alpha for mask in self.masks().values()]

    def mask_parameters(self) -> list[nn.Parameter]:
        """What the optimizer trains: :meth:`delta_parameters` then :meth:`gate_parameters`."""
        return self.delta_parameters() + self.gate_parameters()

    def expected_l0(self) -> Tensor:
        """``()`` expected number of non-zero entries of z, in [0, total], differentiable in ``log_alpha``.

        Σ P(z != 0) (Louizos et al. 2018, Eq. 12); once fixed, the number of kept entries (constant).
        """
        masks = list(self.masks().values())
        if self.stage == "fixed":
            return sum(mask.kept.sum() for mask in masks).to(torch.float32)
        return torch.stack([mask.gate.expected_l0().to(masks[0].gate.log_alpha.device) for mask in masks]).sum()

    def expected_density(self) -> Tensor:
        """``()`` ``expected_l0() / total``, in [0, 1]; a controller drives ``1 - expected_density()``."""
        return self.expected_l0() / self.total

    def kept_masks(self) -> dict[str, Tensor]:
        """name -> ``(*p)`` bool, the entries the magnitude cut kept.

        Raises:
            RuntimeError: no :meth:`magnitude_cut` yet.
        """
        if self.stage == "l0":
            raise RuntimeError("no magnitude cut yet; call magnitude_cut(budget) first")
        return {name: mask.kept.clone() for name, mask in self.masks().items()}

    def magnitude_cut(self, budget: float) -> int:
        """Stage (b): keep exactly ``round(budget * total)`` entries of ``|z_eval ⊙ delta|``.

        Ranks over all masked parameters jointly (Guo et al. 2021 keep the top t% of the whole
        diff vector); equal magnitudes keep the entry that comes first in ``names`` order, then
        in row-major order. Python's ``round`` (half to even) turns ``budget * total`` into a
        count. The mask is recorded; the model computes as before until :meth:`fix_mask`.
        Calling it again (before ``fix_mask``) replaces the cut.

        Args:
            budget: fraction of the masked entries to keep, in (0, 1].

        Returns:
            The number of entries kept (an int in [1, total]).

        Raises:
            ValueError: budget not a real number in (0, 1], or so small that it keeps no entry;
                NaN in ``delta``.
            RuntimeError: the mask is fixed already.
        """
        if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not 0.0 < float(budget) <= 1.0:
            raise ValueError(f"budget must be a fraction of entries in (0, 1]; got {budget!r}")
        if self.stage == "fixed":
            raise RuntimeError("the mask is fixed already; magnitude_cut comes before fix_mask")
        masks = list(self.masks().values())
        total = self.total
        k = round(float(budget) * total)
        if k == 0:
            raise ValueError(f"budget {budget!r} keeps round({budget!r} * {total}) = 0 of the {total} entries; "
                             f"expected a budget of at least {0.5 / total:.3g}")
        device = masks[0].delta.device
        dtype = functools.reduce(torch.promote_types, [mask.delta.dtype for mask in masks])  # exact for each
        scores = torch.cat([mask.cut_scores().to(device, dtype).flatten() for mask in masks])
        if torch.isnan(scores).any():
            raise ValueError("delta holds NaN; the magnitude cut cannot rank it (did training diverge?)")
        keep = topk_mask(scores, k)
        with torch.no_grad():
            for mask, part in zip(masks, keep.split([m.numel_masked for m in masks])):
                mask.kept.copy_(part.view(mask.kept.shape))
                mask.stage.fill_(_CUT)
        return k

    def fix_mask(self) -> None:
        """Stage (c): ``z`` becomes the cut's binary mask; only kept entries of ``delta`` train.

        ``delta`` becomes ``where(kept, z_eval * delta, 0)``, so the model computes right after as
        it did in eval mode with the cut applied; ``log_alpha`` is frozen and its gradient and
        ``delta``'s are cleared. The entries of ``delta`` outside the mask get zero gradients, and
        stay exactly 0 under SGD/Adam/AdamW with weight decay, as long as the optimizer holds no
        momentum from stage (a): build a fresh optimizer over :meth:`mask_parameters` (the model
        never reads those entries anyway: ``z`` is 0 there).

        Raises:
            RuntimeError: no :meth:`magnitude_cut` yet, or fixed already.
        """
        stage = self.stage
        if stage != "cut":
            raise RuntimeError("call magnitude_cut(budget) first" if stage == "l0" else "the mask is fixed already")
        with torch.no_grad():
            for mask in self.masks().values():
                z = mask.gate.deterministic_mask().to(mask.delta.dtype)
                mask.delta.copy_(torch.where(mask.kept, z * mask.delta, torch.zeros_like(mask.delta)))
                mask.stage.fill_(_FIXED)
                mask.gate.log_alpha.requires_grad_(False)
                mask.gate.log_alpha.grad = None
                mask.delta.grad = None


def apply_diff_masks(
    model: nn.Module,
    parameters: Iterable[str],
    *,
    init_log_alpha: float = DEFAULT_INIT_LOG_ALPHA,
    temperature: float = DEFAULT_TEMPERATURE,
    stretch: tuple[float, float] = DEFAULT_STRETCH,
) -> DiffMaskHandle:
    """Put a diff mask (Guo, Rush & Kim 2021) on each named parameter of ``model`` (in place).

    Each parameter ``p`` gets a :class:`DiffMask` through ``torch.nn.utils.parametrize`` (the
    model's classes are not forked) and is frozen (``requires_grad=False``); ``delta`` starts
    at 0, so the masked model equals the base model. Train :meth:`DiffMaskHandle.mask_parameters`
    with the task loss plus a penalty on :meth:`DiffMaskHandle.expected_density`.

    Args:
        model: any module.
        parameters: qualified names from ``model.named_parameters()`` (each at least 1-d).
        init_log_alpha: initial ``log_alpha`` of every gate, finite (default 5).
        temperature: β > 0 (default 1).
        stretch: (γ, ζ) with γ < 0 < 1 < ζ (default (-1.5, 1.5)).

    Returns:
        :class:`DiffMaskHandle` (stage ``"l0"``).

    Raises:
        TypeError, ValueError: bad ``parameters`` (see
            :func:`learnmask.params.persist.resolve_parameter_names`), a 0-d parameter, a non-finite
            ``init_log_alpha``, a bad temperature or stretch.
    """
    if isinstance(init_log_alpha, bool) or not isinstance(init_log_alpha, numbers.Real) \
            or not math.isfinite(init_log_alpha):
        raise ValueError(f"init_log_alpha must be a finite number; got {init_log_alpha!r}")
    chosen = resolve_parameter_names(model, parameters)
    scalars = [name for name, owner, attr in chosen if owner._parameters[attr].dim() == 0]
    if scalars:
        raise ValueError(f"{scalars} are 0-d parameters; diff masks gate entries of parameters of at least 1 dimension")
    masks = [DiffMask(owner._parameters[attr], target=name, init_log_alpha=float(init_log_alpha),
                      temperature=temperature, stretch=stretch) for name, owner, attr in chosen]
    for (_, owner, attr), mask in zip(chosen, masks):  # every mask built (and validated) before any is attached
        attach(owner, attr, mask)
    return DiffMaskHandle(model, [name for name, _, _ in chosen])

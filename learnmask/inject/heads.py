"""``apply_head_gates``: head gates only, a thin wrapper of :func:`~learnmask.inject.apply_masks`.

One gate value per head per attention block, ``(L, H)`` (Michel et al., 2019's ``head_mask``;
CoFi pruning's ``head_z``, Xia et al., 2022). It returns the same :class:`MaskHandle` as every
other granularity: the gate is ``handle.gates["heads"]``.
"""
from __future__ import annotations

from torch import nn

from learnmask.gates import Gate
from learnmask.inject.handle import MaskHandle
from learnmask.inject.masks import apply_masks


def apply_head_gates(model: nn.Module, gate: Gate | str = "hard_concrete", *, target_modules: list[str] | None = None,
                     num_heads: int | None = None, register: bool | None = None, attention: str = "auto",
                     backend: str = "auto", **gate_options) -> MaskHandle:
    """``apply_masks(model, heads=True, ...)``: one gate per head per attention block.

    Args:
        model: a supported architecture (``learnmask.inject.SUPPORTED``), or any model with
            ``target_modules`` (names of the attention output projections whose input is the
            concatenation of the heads) and ``num_heads``.
        gate: a :class:`Gate` of shape ``(L, H)`` or a registered gate kind, built with
            ``gate_options`` (e.g. ``init_log_alpha=3.0``).
        register, attention, backend: as :func:`~learnmask.inject.apply_masks`.

    Returns:
        a :class:`MaskHandle` gating ``"heads"`` only.

    Raises:
        ValueError, TypeError: as :func:`~learnmask.inject.apply_masks` (no attention blocks, a
            gate of the wrong shape or type, a model that already carries gates, ...).
    """
    options = {"heads": True, "attention": attention, "backend": backend}
    if target_modules is not None:
        options.update(target_modules=list(target_modules), num_heads=num_heads)
    elif num_heads is not None:
        raise ValueError("num_heads is read from the model; pass it only with target_modules")
    if isinstance(gate, str):
        return apply_masks(model, gate=gate, gate_options=gate_options, register=register, **options)
    if gate_options:
        raise ValueError(f"gate options {sorted(gate_options)} given with a ready-made gate; build the gate with them")
    if not isinstance(gate, Gate):
        raise TypeError(f"gate must be a learnmask Gate or a registered gate kind name; got {type(gate).__name__}")
    return apply_masks(model, gates={"heads": gate}, register=register, **options)

"""Additive attention biases from boolean keep-masks and back, without overflow in any dtype.

Convention: a keep-mask is True where attention is allowed; its bias is 0 there and exactly
``finfo(dtype).min`` elsewhere. Masks are combined as booleans and converted once (see
:mod:`learnmask.masks.attention`); biases built separately are summed with :func:`add_biases`, which
clamps at ``finfo(dtype).min`` so two masked cells never become ``-inf``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["keep_to_bias", "bias_to_keep", "add_biases"]


def keep_to_bias(keep: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Additive bias from a boolean keep-mask: 0 where True, exactly ``finfo(dtype).min`` where
    False (never ``-inf``, so a fully masked row gives a finite softmax in every dtype).

    Raises:
        TypeError: ``keep`` is not boolean or ``dtype`` is not floating.
    """
    if keep.dtype != torch.bool:
        raise TypeError(f"keep must be a bool tensor (True = attend); got {keep.dtype}")
    if not dtype.is_floating_point:
        raise TypeError(f"bias dtype must be floating; got {dtype}")
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


def bias_to_keep(bias: Tensor) -> Tensor:
    """Boolean keep-mask from an additive mask bias: cells equal to 0 are kept; ``-inf`` and cells at
    or below ``finfo(float16).min`` (every floating dtype's ``finfo.min`` qualifies) are masked.

    Raises:
        TypeError: ``bias`` is not floating point.
        ValueError: a cell holds another value (NaN, a finite score bias such as ALiBi): a score
            bias is not a mask; pass a boolean keep-mask instead.
    """
    if not bias.is_floating_point():
        raise TypeError(f"an additive bias must be floating point; got {bias.dtype}")
    masked = bias <= torch.finfo(torch.float16).min
    keep = bias == 0
    if not bool((masked | keep).all()):
        bad = bias[~(masked | keep)].flatten()[:3].tolist()
        raise ValueError(
            f"additive mask bias holds values other than 0 and -inf/finfo.min (e.g. {bad}); masked_attention "
            "takes masks, not score biases. Pass a boolean keep-mask (True = attend) or an AttentionMask")
    return keep


def add_biases(*biases: Tensor) -> Tensor:
    """Sum additive biases of one dtype, clamped below at ``finfo(dtype).min`` so two masked cells
    never overflow to ``-inf`` (``min + min`` is ``-inf`` in IEEE arithmetic).

    Raises:
        ValueError: no bias given, or dtypes differ.
    """
    if not biases:
        raise ValueError("add_biases needs at least one bias")
    dtype = biases[0].dtype
    if any(b.dtype != dtype for b in biases):
        raise ValueError(f"biases have different dtypes {[b.dtype for b in biases]}; convert them first")
    total = biases[0]
    for b in biases[1:]:
        total = total + b
    return total.clamp(min=torch.finfo(dtype).min)

"""PyTorch's fused CPU FlashAttention kernels, forward (with log-sum-exp) and backward, as callables.

``scaled_dot_product_attention`` hides the log-sum-exp its CPU flash kernel computes, so a caller
that splits attention into groups cannot run the kernel's fused backward on each group later. These
are the ATen ops behind it (``aten::_scaled_dot_product_flash_attention_for_cpu`` and its
``_backward``); they are internal to PyTorch, so :func:`available` checks they exist and callers fall
back to public operations when they do not (other devices, other torch versions).

Grouped-query attention: the ops want as many key heads as query heads, so the G = Hq / Hkv query
heads that share a key head are stacked along the query rows instead (no copy of k or v).

Legend: b batch rows, Hq query heads, Hkv key/value heads, G = Hq // Hkv, R query rows, L keys,
D head dim, Dv value head dim.
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import Tensor

__all__ = ["available", "forward", "backward", "float_mask"]

_FORWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def available(q: Tensor) -> bool:
    """Whether the fused CPU kernels can take tensors like ``q`` here."""
    return _FORWARD is not None and _BACKWARD is not None and q.device.type == "cpu"


def float_mask(keep: Tensor | None, lg: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Additive mask in ``dtype`` (the kernels want the query's dtype): ``log z`` (or 0) where kept,
    ``-inf`` elsewhere; None when nothing is masked. A row with no kept key gives output 0 and
    zero gradients in these kernels (its log-sum-exp is reported as 0 and every probability is 0)."""
    if keep is None and lg is None:
        return None
    if lg is None:
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))
    bias = lg.to(dtype)
    return bias if keep is None else bias.masked_fill(~keep, float("-inf"))


def _stack(x: Tensor, groups: int) -> Tensor:
    return x if groups == 1 else rearrange(x, "b (hk g) r d -> b hk (g r) d", g=groups)


def _unstack(x: Tensor, groups: int) -> Tensor:
    return x if groups == 1 else rearrange(x, "b hk (g r) d -> b (hk g) r d", g=groups)


def _stack_mask(mask: Tensor | None, groups: int) -> Tensor | None:
    if mask is None or groups == 1 or mask.shape[2] == 1:
        return mask
    if mask.shape[1] == 1:
        return repeat(mask, "b one r l -> b one (g r) l", g=groups)
    return rearrange(mask, "b (hk g) r l -> b hk (g r) l", g=groups)


def forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """Output (b, Hq, R, Dv) and log-sum-exp (b, Hkv, G·R) of q (b, Hq, R, D) against k, v (b, Hkv, L, ·)."""
    groups = q.shape[1] // k.shape[1]
    out, lse = _FORWARD(_stack(q, groups), k, v, 0.0, False, attn_mask=_stack_mask(mask, groups), scale=scale)
    return _unstack(out, groups), lse


def backward(d_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Tensor | None,
             scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """dq (b, Hq, R, D), dk (b, Hkv, L, D), dv (b, Hkv, L, Dv) from the saved output and log-sum-exp."""
    groups = q.shape[1] // k.shape[1]
    dq, dk, dv = _BACKWARD(_stack(d_out.contiguous(), groups), _stack(q, groups), k, v, _stack(out, groups), lse,
                           0.0, False, attn_mask=_stack_mask(mask, groups), scale=scale)
    return _unstack(dq, groups), dk, dv

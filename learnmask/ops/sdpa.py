"""The ``sdpa`` masked-attention backend: ``torch.nn.functional.scaled_dot_product_attention``
with the mask materialized densely.

The keep-mask (B | 1, Hq | 1, Q, K) goes to SDPA as a boolean ``attn_mask``; with a token gate it
becomes a float mask ``log z`` on kept keys and ``-inf`` elsewhere (SDPA adds a float mask to the
scores, so gradients reach z). A pure causal mask with Q == K and no gate uses ``is_causal=True``.
Rows with no kept key are unmasked before the call and zeroed after it, so their output is 0 and
their gradients are 0 on every device and SDPA kernel (some kernels give NaN for such rows).

Legend: B batch, Hq query heads, Hkv key/value heads, Q query length, K key length, Dv value dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from learnmask.masks.structure import MaskStructure
from learnmask.ops.base import AttentionInputs
from learnmask.ops.common import apply_head_gate, dense_keep, empty_attention, expand_kv, is_empty, log_gate

__all__ = ["SDPABackend", "sdpa_with_mask"]

# enable_gqa arrived in torch 2.5 (SDPA is a builtin: no inspectable signature, but its docstring names it).
_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def is_pure_causal(s: MaskStructure | None) -> bool:
    """Whether ``s`` is exactly the causal mask (nothing else)."""
    return s is not None and s.is_pure_causal


def sdpa_with_mask(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, lg: Tensor | None, scale: float,
                   is_causal: bool = False, dropout_p: float = 0.0) -> Tensor:
    """SDPA with a keep-mask and/or a log gate (and SDPA's own dropout), zeros for rows with no kept key.

    Args:
        q: (B, Hq, Q, D); k, v: (B, Hkv, K, D | Dv).
        keep: bool broadcastable to (B, Hq, Q, K), or None.
        lg: log token gate broadcastable to (B, 1, 1, K) (``-inf`` = removed key), or None.
    """
    attn_mask: Tensor | None = None
    row_ok: Tensor | None = None
    if lg is not None:
        gate_keep = torch.isfinite(lg)
        keep = gate_keep if keep is None else keep & gate_keep
    if keep is not None:
        row_ok = keep.any(-1, keepdim=True)
        if bool(row_ok.all()):
            row_ok = None
        else:
            keep = keep | ~row_ok
        if lg is None:
            attn_mask = keep
        else:
            finite_lg = torch.where(torch.isfinite(lg), lg, torch.zeros_like(lg))
            attn_mask = torch.where(keep, finite_lg, float("-inf")).to(q.dtype)
    kwargs = {}
    if k.shape[1] != q.shape[1]:
        if _HAS_GQA:
            kwargs["enable_gqa"] = True
        else:
            k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal and attn_mask is None,
                                         scale=scale, dropout_p=dropout_p, **kwargs)
    if row_ok is not None:
        out = out.masked_fill(~row_ok, 0)
    return out


class SDPABackend:
    """Dense-mask ``scaled_dot_product_attention``: takes every input; memory grows as B·Q·K for
    the mask (and B·Hq·Q·K inside SDPA when a gate needs gradients, or with dropout, which SDPA
    computes with its math kernel on CPU)."""

    name = "sdpa"

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        """Always empty: every valid input can be given to SDPA as a dense mask."""
        return []

    def __call__(self, inputs: AttentionInputs) -> Tensor:
        """Output (B, Hq, Q, Dv) in q's dtype (zeros when Q == 0 or K == 0)."""
        q, k = inputs.q, inputs.k
        if is_empty(inputs):
            return empty_attention(inputs)
        lg = None if inputs.token_gate is None else log_gate(inputs.token_gate, q.dtype)[:, None, None, :]
        causal_fast = lg is None and is_pure_causal(inputs.structure) and q.shape[2] == k.shape[2]
        keep = None if causal_fast else dense_keep(inputs)
        out = sdpa_with_mask(q, k, inputs.v, keep, lg, inputs.scale, is_causal=causal_fast, dropout_p=inputs.dropout_p)
        return apply_head_gate(out, inputs.head_gate)

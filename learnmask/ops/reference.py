"""The ``reference`` masked-attention backend: eager math in float64, the spec every backend meets.

Computes exactly the semantics of :mod:`learnmask.ops.base` with a dense (B, Hq, Q, K) score
tensor, so it is for tests and small shapes. A fully masked row (no kept key, or every kept key
gated to z == 0) gives zeros and zero gradients: its softmax denominator is replaced by 1 and its
row maximum by 0 before any ``inf - inf`` can appear. Dropout (``dropout_p``) is drawn explicitly on
the probabilities in the compute dtype from torch's global generator.

Legend: B batch, Hq query heads, Hkv key/value heads, Q query length, K key length, D head dim,
Dv value head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from learnmask.ops.base import AttentionInputs
from learnmask.ops.common import apply_head_gate, dense_keep, empty_attention, expand_kv, is_empty, log_gate

__all__ = ["ReferenceBackend"]


class ReferenceBackend:
    """Eager masked attention. ``compute_dtype`` is float64 (the spec) by default; a low-precision
    ``compute_dtype`` (e.g. the inputs' own, ``"input"``) gives the "reference in the test dtype" of
    three-way tests (FlexAttention's test pattern: golden float64, reference in dtype, fast kernel).
    The output is cast back to q's dtype.
    """

    name = "reference"

    def __init__(self, compute_dtype: torch.dtype | str = torch.float64) -> None:
        floating = isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point
        if compute_dtype != "input" and not floating:
            raise ValueError(f"compute_dtype must be a floating torch.dtype or 'input'; got {compute_dtype!r}")
        self.compute_dtype = compute_dtype

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        """Always empty: the reference takes every valid input (memory grows as B·Hq·Q·K)."""
        return []

    def __call__(self, inputs: AttentionInputs) -> Tensor:
        """Output (B, Hq, Q, Dv) in q's dtype (zeros when Q == 0 or K == 0)."""
        q = inputs.q
        if is_empty(inputs):
            return empty_attention(inputs)
        dtype = q.dtype if self.compute_dtype == "input" else self.compute_dtype
        hq = q.shape[1]
        k, v = expand_kv(inputs.k.to(dtype), hq), expand_kv(inputs.v.to(dtype), hq)
        scores = torch.einsum("bhqd,bhkd->bhqk", q.to(dtype), k) * inputs.scale
        keep = dense_keep(inputs)
        if inputs.token_gate is not None:
            lg = log_gate(inputs.token_gate, dtype)[:, None, None, :]
            scores = scores + lg
            gate_keep = (inputs.token_gate > 0)[:, None, None, :]
            keep = gate_keep if keep is None else keep & gate_keep
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        row_max = scores.amax(-1, keepdim=True).detach()
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        weights = torch.exp(scores - row_max)
        denom = weights.sum(-1, keepdim=True)
        denom = torch.where(denom > 0, denom, torch.ones_like(denom))
        probs = weights / denom
        if inputs.dropout_p > 0:  # SDPA's dropout: zero with probability p, scale the rest by 1 / (1 - p)
            kept = torch.rand(probs.shape, dtype=dtype, device=probs.device) >= inputs.dropout_p
            probs = probs * kept / (1.0 - inputs.dropout_p)
        out = torch.einsum("bhqk,bhkd->bhqd", probs, v)
        return apply_head_gate(out, inputs.head_gate).to(q.dtype)

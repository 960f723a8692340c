"""Helpers every masked-attention backend shares: the log token gate, the head gate, the dense mask.

Legend: B batch, Hq query heads, Hkv key/value heads, Q query length, K key length, Dv value dim.
"""

from __future__ import annotations

import torch
from einops import repeat
from torch import Tensor

from learnmask.ops.base import AttentionInputs

__all__ = ["log_gate", "apply_head_gate", "dense_keep", "grad_needed", "expand_kv", "is_empty", "empty_attention"]


def log_gate(token_gate: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``log z`` of a token gate z (B, K) in [0, 1], with ``-inf`` where z == 0 (the key is removed).

    The gradient with respect to z is ``1 / z`` where z > 0 and 0 where z == 0 (a removed key gets no
    gradient: the one-sided derivative there is finite, but every gate of this library that reaches
    exactly 0 does so through a clamp whose own slope is 0, e.g. hard-concrete; Louizos et al., 2018).
    """
    z = token_gate if dtype is None else token_gate.to(dtype)
    positive = z > 0
    return torch.where(positive, torch.where(positive, z, torch.ones_like(z)).log(), float("-inf"))


def apply_head_gate(out: Tensor, head_gate: Tensor | None) -> Tensor:
    """``out[b, h] *= g[(b,) h]`` for out (B, Hq, Q, Dv) and g (Hq,) or (B, Hq); out's dtype is kept."""
    if head_gate is None:
        return out
    g = head_gate.to(out.dtype)
    g = g.view(1, -1, 1, 1) if g.dim() == 1 else g.view(g.shape[0], g.shape[1], 1, 1)
    return out * g


def dense_keep(inputs: AttentionInputs) -> Tensor | None:
    """Boolean keep-mask (B | 1, Hq | 1, Q, K) of the inputs' mask, or None when nothing is masked
    (memoized on an AttentionMask, so the layers of a model sharing one mask build it once)."""
    mask = inputs.mask
    if mask is None:
        return None
    if isinstance(mask, Tensor):
        return mask
    b, hq, q_len, kv_len = inputs.q.shape[0], inputs.q.shape[1], inputs.q.shape[2], inputs.k.shape[2]
    device = inputs.q.device
    return mask.cached(("keep", b, hq, q_len, kv_len, str(device)), lambda: mask.keep(b, hq, q_len, kv_len, device))


def grad_needed(inputs: AttentionInputs) -> bool:
    """Whether autograd will want gradients of q, k, v or the token gate from this call."""
    if not torch.is_grad_enabled():
        return False
    tensors = (inputs.q, inputs.k, inputs.v, inputs.token_gate)
    return any(t is not None and t.requires_grad for t in tensors)


def expand_kv(x: Tensor, query_heads: int) -> Tensor:
    """(B, Hkv, K, D) -> (B, Hq, K, D) for grouped-query attention: query head h reads kv head
    ``h // (Hq // Hkv)``."""
    groups = query_heads // x.shape[1]
    return x if groups == 1 else repeat(x, "b hk k d -> b (hk g) k d", g=groups)


def is_empty(inputs: AttentionInputs) -> bool:
    """No query or no key (Q == 0 or K == 0)."""
    return inputs.q.shape[2] == 0 or inputs.k.shape[2] == 0


def empty_attention(inputs: AttentionInputs) -> Tensor:
    """The answer to a call with Q == 0 or K == 0: (B, Hq, Q, Dv) zeros (a query with no key keeps
    nothing), computed from q, k, v (and the gates) so that autograd gives them zero gradients."""
    q, hq = inputs.q, inputs.q.shape[1]
    scores = torch.einsum("bhqd,bhkd->bhqk", q, expand_kv(inputs.k, hq))  # (B, Hq, Q, K) with Q or K == 0
    out = torch.einsum("bhqk,bhkd->bhqd", scores, expand_kv(inputs.v, hq))
    if inputs.token_gate is not None:
        out = out + 0 * inputs.token_gate.sum().to(out.dtype)
    return apply_head_gate(out, inputs.head_gate)

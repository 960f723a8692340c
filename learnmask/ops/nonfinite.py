"""The one rule for non-finite keys and values, kept by :func:`~learnmask.ops.masked_attention` on
every backend (issue 12, item 8):

    A key removed from a query row — by the mask, or by a token gate of 0 — cannot affect that
    row's output or its gradients, whatever ``k`` and ``v`` hold there (NaN, ±inf included).
    A row that keeps a key whose ``k`` or ``v`` is not finite is NaN (and so are its gradients).

Why the op, not each backend: every backend multiplies probabilities by values, and ``0 * NaN`` is
NaN, so a NaN value in a masked-out key poisoned the rows that share a tile (or, for dense SDPA,
every row) with it, differently on each backend. Here the keys holding a non-finite entry are found
(one summing pass over k and v, and one host synchronisation), zeroed before the backend runs, and the rows
that keep one of them are set to NaN afterwards. Which rows keep one is itself an attention: queries
of zeros against the same mask and token gate, with values 1 on the bad keys (run by ``blocks``,
which takes every mask), is > 0 exactly on those rows. Queries are not covered: a non-finite query
makes its own row NaN, as the math does.

Legend: B batch, Hq query heads, Hkv key/value heads, Q query length, K key length, Dv value dim.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import Tensor

from learnmask.ops.base import AttentionInputs

__all__ = ["non_finite_keys", "with_finite_keys"]


def non_finite_keys(inputs: AttentionInputs) -> Tensor | None:
    """(B, Hkv, K) bool: the keys whose k or v holds a non-finite entry; None when every entry is finite."""
    k, v = inputs.k, inputs.v
    if k.numel() == 0 and v.numel() == 0:
        return None
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(k.sum(dtype=acc) + v.sum(dtype=acc))):  # one cheap pass; NaN and inf propagate
        return None
    bad = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))
    return bad if bool(bad.any()) else None  # the sum overflowed on finite values


def with_finite_keys(run: Callable[[AttentionInputs], Tensor], inputs: AttentionInputs, bad: Tensor) -> Tensor:
    """``run`` on the inputs with the ``bad`` keys (B, Hkv, K) zeroed; rows keeping a bad key made NaN.

    Returns:
        (B, Hq, Q, Dv), NaN on rows that keep a bad key. A gradient arriving at such a row becomes
        NaN (as the math gives); a loss that does not read those rows gets the clean gradients.
    """
    keep_bad = bad[..., None]
    clean = dataclasses.replace(inputs, k=torch.where(keep_bad, 0, inputs.k), v=torch.where(keep_bad, 0, inputs.v))
    out = run(clean)
    poisoned = _rows_keeping(inputs, bad)
    if not bool(poisoned.any()):
        return out
    return _NaNRows.apply(out, poisoned[..., None])


class _NaNRows(torch.autograd.Function):
    """``out`` with the ``rows`` (broadcastable bool) set to NaN; a nonzero gradient arriving at them
    goes on as NaN, a zero one as zero (so a loss that ignores those rows is unaffected)."""

    @staticmethod
    def forward(ctx, out: Tensor, rows: Tensor) -> Tensor:
        ctx.save_for_backward(rows)
        return out.masked_fill(rows, float("nan"))

    @staticmethod
    def backward(ctx, grad: Tensor):
        (rows,) = ctx.saved_tensors
        return grad.masked_fill(rows & (grad != 0), float("nan")), None


def _rows_keeping(inputs: AttentionInputs, bad: Tensor) -> Tensor:
    """(B, Hq, Q) bool: rows that keep some key marked in ``bad`` (B, Hkv, K)."""
    from learnmask.ops.blocks import BlocksBackend

    q = inputs.q
    batch, heads, q_len = q.shape[:3]
    kv_heads, kv_len = bad.shape[1], bad.shape[2]
    gate = inputs.token_gate
    probe = AttentionInputs(
        q=torch.zeros(batch, heads, q_len, 1, dtype=torch.float64, device=q.device),
        k=torch.zeros(batch, kv_heads, kv_len, 1, dtype=torch.float64, device=q.device),
        v=bad.to(torch.float64)[..., None], mask=inputs.mask, structure=inputs.structure, head_gate=None,
        token_gate=None if gate is None else gate.detach().to(torch.float64), scale=1.0)
    with torch.no_grad():
        return BlocksBackend()(probe)[..., 0] > 0

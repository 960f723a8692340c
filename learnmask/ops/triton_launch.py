"""Launching the fused masked-attention kernels: per-row interval tables, autotuning, autograd.

Imported only when the ``triton`` backend runs (it imports triton and the kernels). The block
tables FlashAttention-style kernels need are reduced here to per-row key intervals and per-key
query intervals (:func:`interval_tables`), computed with a few vectorised torch ops and no host
synchronisation, and cached per :class:`MaskStructure` object (like a FlexAttention ``BlockMask``
that is built once and reused across layers and steps).

Legend: B batch, H query heads, Hkv key/value heads, Q query length, K key length, D head dim,
Dv value head dim.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass

import torch
import triton
from einops import reduce
from torch import Tensor
from torch.autograd.function import once_differentiable

from learnmask.ops import triton_kernels as fwd_kernels
from learnmask.ops import triton_kernels_bwd as bwd_kernels
from learnmask.ops.structure import MaskStructure

LOG2E = 1.4426950408889634
DOC_SENTINEL = torch.iinfo(torch.int64).min
"""Document id given to padding keys in the exact-check table (user document ids must differ)."""


@dataclass(frozen=True, eq=False)
class IntervalTables:
    """Documents and key padding as intervals (all int32 unless noted).

    ``rows`` (B, 4, Q): per query row, ``[lo, hi)`` a superset of its kept keys and ``[full_lo,
    full_hi)`` keys surely kept; ``cols`` (B, 4, K): the same per key over queries. ``exact`` (B,)
    is 1 where ``[lo, hi)`` is exactly the kept set (key documents sorted, padding one run); else
    kernels also compare ``q_doc`` (B, Q) int64 with ``kv_doc`` (B, K) int64 in partial blocks.
    """

    rows: Tensor
    cols: Tensor
    q_doc: Tensor
    kv_doc: Tensor
    exact: Tensor


def _per_batch(t: Tensor, batch: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    t = t.to(device=device, dtype=dtype)
    return t.expand(batch, *t.shape[1:]).contiguous()


def _sorted_rows(ids: Tensor) -> Tensor:
    """(B,) bool: each row of ids (B, N) is non-decreasing."""
    return (ids[:, 1:] >= ids[:, :-1]).all(dim=1)


def _doc_intervals(q_doc: Tensor, kv_doc: Tensor, q_len: int, kv_len: int):
    """Key interval of each query's document (exact where key ids are sorted) and the converse."""
    kv_sorted, q_sorted = _sorted_rows(kv_doc), _sorted_rows(q_doc)
    r_lo = torch.searchsorted(kv_doc, q_doc)
    r_hi = torch.searchsorted(kv_doc, q_doc, right=True)
    r_lo = torch.where(kv_sorted[:, None], r_lo, 0)
    r_hi = torch.where(kv_sorted[:, None], r_hi, kv_len)
    c_lo = torch.searchsorted(q_doc, kv_doc)
    c_hi = torch.searchsorted(q_doc, kv_doc, right=True)
    c_full = (torch.where(q_sorted[:, None], c_lo, 0), torch.where(q_sorted[:, None], c_hi, 0))
    c_lo = torch.where(q_sorted[:, None], c_lo, 0)
    c_hi = torch.where(q_sorted[:, None], c_hi, q_len)
    return r_lo, r_hi, kv_sorted, c_lo, c_hi, c_full


def interval_tables(structure: MaskStructure, batch: int, q_len: int, kv_len: int,
                    device: torch.device) -> IntervalTables | None:
    """Interval tables of the documents and key padding of ``structure``; None when it has neither.

    Sorted (packed) documents and a single run of real keys (left or right padding) give exact
    intervals, so kernels visit only the key blocks of a query block's documents; anything else is
    still correct, with an elementwise document check in the visited blocks.
    """
    has_docs = structure.q_document_ids is not None
    if not has_docs and structure.key_padding is None:
        return None
    zeros_q = torch.zeros(batch, q_len, dtype=torch.int64, device=device)
    zeros_k = torch.zeros(batch, kv_len, dtype=torch.int64, device=device)
    if has_docs:
        q_doc = _per_batch(structure.q_document_ids, batch, device, torch.int64)
        kv_doc = _per_batch(structure.kv_document_ids, batch, device, torch.int64)
        r_lo, r_hi, exact, c_lo, c_hi, (c_flo, c_fhi) = _doc_intervals(q_doc, kv_doc, q_len, kv_len)
    else:
        q_doc, kv_doc = zeros_q, zeros_k
        r_lo, r_hi, c_lo, c_flo = zeros_q, zeros_q + kv_len, zeros_k, zeros_k
        c_hi = c_fhi = zeros_k + q_len
        exact = torch.ones(batch, dtype=torch.bool, device=device)
    if structure.key_padding is not None:
        real = _per_batch(structure.key_padding, batch, device, torch.bool)
        n_real = real.sum(dim=1)
        first = torch.argmax(real.to(torch.int8), dim=1)
        last = kv_len - torch.argmax(real.flip(1).to(torch.int8), dim=1)
        first, last = torch.where(n_real > 0, first, 0), torch.where(n_real > 0, last, 0)
        exact = exact & (n_real == last - first)
        r_lo, r_hi = torch.maximum(r_lo, first[:, None]), torch.minimum(r_hi, last[:, None])
        c_lo, c_hi = torch.where(real, c_lo, 0), torch.where(real, c_hi, 0)
        c_flo, c_fhi = torch.where(real, c_flo, 0), torch.where(real, c_fhi, 0)
        kv_doc = torch.where(real, kv_doc, DOC_SENTINEL)
    r_flo, r_fhi = torch.where(exact[:, None], r_lo, 0), torch.where(exact[:, None], r_hi, 0)
    rows = torch.stack([r_lo, r_hi, r_flo, r_fhi], dim=1).to(torch.int32).contiguous()
    cols = torch.stack([c_lo, c_hi, c_flo, c_fhi], dim=1).to(torch.int32).contiguous()
    return IntervalTables(rows, cols, q_doc.contiguous(), kv_doc.contiguous(), exact.to(torch.int32))


_CACHE: "weakref.WeakKeyDictionary[MaskStructure, dict]" = weakref.WeakKeyDictionary()


def _fingerprint(t: Tensor | None):
    return None if t is None else (t.data_ptr(), t._version, tuple(t.shape), str(t.device))


def cached_tables(structure: MaskStructure, batch: int, q_len: int, kv_len: int, device: torch.device):
    """(prefix lengths (B,) int32 or None, :class:`IntervalTables` or None), cached per structure.

    The cache key holds each tensor's storage and version counter, so an in-place edit of a
    structure tensor recomputes the tables.
    """
    key = (batch, q_len, kv_len, str(device)) + tuple(
        _fingerprint(t) for t in (structure.prefix_lengths, structure.q_document_ids,
                                  structure.kv_document_ids, structure.key_padding))
    per_structure = _CACHE.setdefault(structure, {})
    if key not in per_structure:
        prefix = None
        if structure.causal and structure.prefix_lengths is not None:
            prefix = _per_batch(structure.prefix_lengths.reshape(-1, 1), batch, device, torch.int32).reshape(batch)
        per_structure.clear()
        per_structure[key] = (prefix, interval_tables(structure, batch, q_len, kv_len, device))
    return per_structure[key]


@dataclass(frozen=True, eq=False)
class LaunchPlan:
    """What the kernels need besides q, k, v and the gate. ``blocks`` None means autotuned (CUDA)."""

    causal: int
    window: int
    chunk: int
    prefix: Tensor | None
    tables: IntervalTables | None
    scale: float
    blocks: tuple[int, int] | None = None

    @classmethod
    def build(cls, structure: MaskStructure, q: Tensor, k: Tensor, scale: float,
              blocks: tuple[int, int] | None) -> "LaunchPlan":
        batch, _, q_len, _ = q.shape
        kv_len = k.shape[2]
        prefix, tables = cached_tables(structure, batch, q_len, kv_len, q.device)
        window = 0 if structure.window is None else min(structure.window, q_len + kv_len)
        chunk = 0 if structure.chunk_size is None else min(structure.chunk_size, q_len + kv_len)
        return cls(int(structure.causal), window, chunk, prefix, tables, float(scale), blocks)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _pad_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _common(q: Tensor, k: Tensor, v: Tensor, z: Tensor | None, plan: LaunchPlan, dummy: Tensor):
    t = plan.tables
    pointers = dict(
        PREFIXp=dummy if plan.prefix is None else plan.prefix,
        ROWp=dummy if t is None else t.rows,
        QDp=dummy if t is None else t.q_doc,
        KDp=dummy if t is None else t.kv_doc,
        EXACTp=dummy if t is None else t.exact,
    )
    row_strides = (0, 0) if t is None else (t.rows.stride(0), t.rows.stride(1))
    meta = dict(HEAD_DIM=q.shape[3], HEAD_DIM_V=v.shape[3], BLOCK_D=_pad_dim(q.shape[3]),
                BLOCK_DV=_pad_dim(v.shape[3]), HAS_GATE=z is not None, HAS_PREFIX=plan.prefix is not None,
                HAS_TABLE=t is not None, PREC=_dot_precision(q.dtype))
    scalars = dict(H=q.shape[1], GROUP=q.shape[1] // k.shape[1], Q=q.shape[2], K=k.shape[2],
                   causal=plan.causal, window=plan.window, chunk=plan.chunk)
    return pointers, row_strides, meta, scalars


def _strides(*tensors: Tensor) -> list[int]:
    return [s for t in tensors for s in t.stride()[:3]]


def _log2_gate(z: Tensor | None) -> Tensor | None:
    """log2 z (B, K) float32, -inf where z == 0 (the kernels add it to base-2 scores)."""
    return None if z is None else torch.log2(z)


def forward(q: Tensor, k: Tensor, v: Tensor, z: Tensor | None, plan: LaunchPlan,
            count: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Output (B, H, Q, Dv) in q's dtype and lse2 (B, H, Q) float32 (+inf for rows keeping nothing).

    ``z`` is the token gate (B, K) float32 contiguous, or None.
    """
    z = _log2_gate(z)
    batch, heads, q_len, _ = q.shape
    out = torch.empty(batch, heads, q_len, v.shape[3], dtype=q.dtype, device=q.device)
    lse2 = torch.empty(batch, heads, q_len, dtype=torch.float32, device=q.device)
    pointers, row_strides, meta, scalars = _common(q, k, v, z, plan, lse2)
    args = [q, k, v, lse2 if z is None else z, out, lse2, pointers["PREFIXp"], pointers["ROWp"], pointers["QDp"],
            pointers["KDp"], pointers["EXACTp"], lse2 if count is None else count,
            *_strides(q, k, v, out), *row_strides]
    scalars["scale_log2"] = plan.scale * LOG2E
    if plan.blocks is None:
        grid = lambda m: (triton.cdiv(q_len, m["BLOCK_M"]), batch * heads)  # noqa: E731
        _tuned().fwd[grid](*args, **scalars, **meta, COUNT=False)
    else:
        block_m, block_n = plan.blocks
        grid = (triton.cdiv(q_len, block_m), batch * heads)
        fwd_kernels.attn_fwd[grid](*args, **scalars, **meta, BLOCK_M=block_m, BLOCK_N=block_n,
                                   COUNT=count is not None, num_warps=4, num_stages=2)
    return out, lse2


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, z: Tensor | None, out: Tensor, lse2: Tensor,
             plan: LaunchPlan, need_dq: bool = True, need_dkdv: bool = True, count: Tensor | None = None):
    """(dq, dk, dv, dbias) with dbias (B, Hkv, K) float32 the score-bias gradient (None without gate).

    A gradient that is not needed is None and its kernel is not launched.
    """
    batch, heads, q_len, _ = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    delta = torch.empty_like(lse2)
    block_delta = 16 if plan.blocks is not None else 64
    fwd_kernels.attn_bwd_delta[(triton.cdiv(q_len, block_delta), batch * heads)](
        out, grad_out, delta, *_strides(out, grad_out), heads, q_len,
        HEAD_DIM_V=v.shape[3], BLOCK_DV=_pad_dim(v.shape[3]), BLOCK_M=block_delta)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    dbias = None if z is None else torch.empty(batch, kv_heads, kv_len, dtype=torch.float32, device=q.device)
    z = _log2_gate(z)
    pointers, row_strides, meta, scalars = _common(q, k, v, z, plan, delta)
    scalars.update(scale=plan.scale, scale_log2=plan.scale * LOG2E)
    zp = delta if z is None else z
    t = plan.tables
    col_strides = (0, 0) if t is None else (t.cols.stride(0), t.cols.stride(1))
    dkdv_args = [q, k, v, zp, grad_out, lse2, delta, dk, dv, delta if dbias is None else dbias,
                 pointers["PREFIXp"], pointers["ROWp"], delta if t is None else t.cols, pointers["QDp"],
                 pointers["KDp"], pointers["EXACTp"], delta if count is None else count,
                 *_strides(q, k, v, grad_out, dk, dv), *row_strides, *col_strides]
    dq_args = [q, k, v, zp, grad_out, lse2, delta, dq, pointers["PREFIXp"], pointers["ROWp"], pointers["QDp"],
               pointers["KDp"], pointers["EXACTp"], *_strides(q, k, v, grad_out, dq), *row_strides]
    if plan.blocks is None:
        tuned = _tuned()
        if need_dkdv:
            tuned.dkdv[lambda m: (triton.cdiv(kv_len, m["BLOCK_N"]), batch * kv_heads)](
                *dkdv_args, **scalars, **meta, COUNT=False)
        if need_dq:
            tuned.dq[lambda m: (triton.cdiv(q_len, m["BLOCK_M"]), batch * heads)](*dq_args, **scalars, **meta)
    else:
        block_m, block_n = plan.blocks
        launch = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=2)
        if need_dkdv:
            bwd_kernels.attn_bwd_dkdv[(triton.cdiv(kv_len, block_n), batch * kv_heads)](
                *dkdv_args, **scalars, **meta, **launch, COUNT=count is not None)
        if need_dq:
            bwd_kernels.attn_bwd_dq[(triton.cdiv(q_len, block_m), batch * heads)](
                *dq_args, **scalars, **meta, **launch)
    if not need_dkdv:
        dk = dv = dbias = None
    return (dq if need_dq else None), dk, dv, dbias


class FusedMaskedAttention(torch.autograd.Function):
    """Autograd of the fused kernel: forward saves lse2 per row; backward recomputes the scores.

    ``z`` is the token gate (B, K) float32 contiguous or None; its gradient is
    ``dbias / z`` where ``z > 0`` and 0 where ``z == 0`` (a removed key has no gradient).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, z: Tensor | None, plan: LaunchPlan) -> Tensor:
        out, lse2 = forward(q, k, v, z, plan)
        ctx.save_for_backward(q, k, v, z, out, lse2)
        ctx.plan = plan
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k, v, z, out, lse2 = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dq, dk, dv, dbias = backward(grad_out, q, k, v, z, out, lse2, ctx.plan, need_dq=needs[0],
                                     need_dkdv=any(needs[1:4]))
        dz = None
        if z is not None and ctx.needs_input_grad[3]:
            dbias = reduce(dbias, "b h k -> b k", "sum")
            dz = torch.where(z > 0, dbias / torch.where(z > 0, z, 1.0), 0.0)
        return dq, dk, dv, dz, None


@dataclass(frozen=True)
class _Tuned:
    fwd: object
    dkdv: object
    dq: object


_TUNED: list[_Tuned] = []


def _bench(fn, quantiles):
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


# (BLOCK_M, BLOCK_N, num_warps, num_stages). All compile for sm_90 without register spills at
# D = 64 (checked offline with ptxas); (32, 128, 4) dK/dV and (128, 32, 4) dQ spill and are left out.
FWD_CONFIGS = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)]
DKDV_CONFIGS = [(64, 128, 8, 3), (64, 64, 4, 3)]
DQ_CONFIGS = [(128, 64, 8, 3), (64, 64, 4, 3)]


def _tuned() -> _Tuned:
    """Autotuned kernels (a few tile sizes and warp counts; tuned per shape, dtype and flags)."""
    if not _TUNED:
        key = ["Q", "K", "H", "GROUP", "HEAD_DIM", "HEAD_DIM_V", "HAS_GATE", "HAS_PREFIX", "HAS_TABLE"]

        def configs(shapes):
            return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]

        tune = dict(key=key)
        if "do_bench" in inspect.signature(triton.autotune).parameters:  # triton >= 3.2: short timings
            tune["do_bench"] = _bench
        _TUNED.append(_Tuned(
            fwd=triton.autotune(configs(FWD_CONFIGS), **tune)(fwd_kernels.attn_fwd),
            dkdv=triton.autotune(configs(DKDV_CONFIGS), **tune)(bwd_kernels.attn_bwd_dkdv),
            dq=triton.autotune(configs(DQ_CONFIGS), **tune)(bwd_kernels.attn_bwd_dq),
        ))
    return _TUNED[0]

"""Triton kernels of the fused masked attention (FlashAttention-2, Dao 2023), with block skipping.

Imported lazily by :mod:`learnmask.ops.triton_backend`. ``TRITON_INTERPRET=1`` is read when this
module is *imported* (``@triton.jit`` picks the interpreter at decoration time), so it must be set
before the first import of this module, not merely before a launch.

That is the same as ``import triton``: triton's own ``@jit`` library functions are decorated when
triton is imported, and a kernel interpreted while they are not (or the converse) fails at launch.
So the variable goes in the environment before triton is first imported and stays set.

The mask is the one of :class:`learnmask.masks.structure.MaskStructure`, reduced per query row i to a
key interval ``[lo_i, hi_i)``: causal, prefix-LM, window and chunk bounds come analytically from a
few integers; documents and key padding from an optional per-row table (B, 4, Q) of
``lo, hi, full_lo, full_hi`` computed by the launcher. ``[lo_i, hi_i)`` is exact when the table's
batch is marked exact; otherwise (unsorted key documents, padding with holes) it is a superset and
partial blocks also compare document ids ``q_doc[i] == kv_doc[j]`` (padding keys carry a sentinel).
The same holds per key j for query intervals (table (B, 4, K)), used by the dK/dV kernel.

A query block visits key blocks ``[b_start, b_end)`` only (blocks outside are fully masked and never
touched), in three runs: partial blocks (mask evaluated elementwise), full blocks (no mask), partial
blocks. Scores live in base 2: ``s2 = log2(e) * scale * q.k + log2 z`` (small problems pass the raw
gate z and the kernels take its log2, saving a launch; large ones pass log2 z, computed once, because
a log2 taken per tile is recomputed by every thread holding the column); ``lse2`` is the row's
log2-sum-exp2, ``+inf`` for a row with no kept key (its output is exactly 0 and its gradients 0).

Legend: B batch, H query heads, Hkv key/value heads (GROUP = H // Hkv), Q query length, K key length,
D head dim (padded to BLOCK_D), Dv value head dim (padded to BLOCK_DV).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

_NO_SPEC = ["Q", "K", "causal", "window", "chunk"]


@triton.jit
def _row_bounds(offs, b, Q, K, causal, window, chunk, prefix_ptr, tab_ptr, tab_sb, tab_sc,
                HAS_PREFIX: tl.constexpr, HAS_TABLE: tl.constexpr):
    """Key interval [lo, hi) of each query row in ``offs`` and its surely-kept part [flo, fhi)."""
    lo = offs * 0
    hi = lo + K
    if HAS_PREFIX:
        causal_hi = tl.maximum(offs + 1, tl.load(prefix_ptr + b))
    else:
        causal_hi = offs + 1
    hi = tl.where(causal != 0, tl.minimum(hi, causal_hi), hi)
    lo = tl.where(window > 0, tl.maximum(lo, offs - window + 1), lo)
    hi = tl.where(window > 0, tl.minimum(hi, offs + 1), hi)
    c = tl.maximum(chunk, 1)
    chunk_lo = (offs // c) * c
    lo = tl.where(chunk > 0, tl.maximum(lo, chunk_lo), lo)
    hi = tl.where(chunk > 0, tl.minimum(hi, chunk_lo + c), hi)
    flo = lo
    fhi = hi
    if HAS_TABLE:
        row = tab_ptr + b.to(tl.int64) * tab_sb + offs
        valid = offs < Q
        lo = tl.maximum(lo, tl.load(row, mask=valid, other=0))
        hi = tl.minimum(hi, tl.load(row + tab_sc, mask=valid, other=0))
        flo = tl.maximum(flo, tl.load(row + 2 * tab_sc, mask=valid, other=0))
        fhi = tl.minimum(fhi, tl.load(row + 3 * tab_sc, mask=valid, other=0))
    return lo, hi, flo, fhi


@triton.jit
def _col_bounds(offs, b, Q, K, causal, window, chunk, prefix_ptr, tab_ptr, tab_sb, tab_sc,
                HAS_PREFIX: tl.constexpr, HAS_TABLE: tl.constexpr):
    """Query interval [lo, hi) of each key in ``offs`` and its surely-kept part [flo, fhi)."""
    lo = offs * 0
    hi = lo + Q
    if HAS_PREFIX:
        causal_lo = tl.where(offs < tl.load(prefix_ptr + b), 0, offs)
    else:
        causal_lo = offs
    lo = tl.where(causal != 0, tl.maximum(lo, causal_lo), lo)
    lo = tl.where(window > 0, tl.maximum(lo, offs), lo)
    hi = tl.where(window > 0, tl.minimum(hi, offs + window), hi)
    c = tl.maximum(chunk, 1)
    chunk_lo = (offs // c) * c
    lo = tl.where(chunk > 0, tl.maximum(lo, chunk_lo), lo)
    hi = tl.where(chunk > 0, tl.minimum(hi, chunk_lo + c), hi)
    flo = lo
    fhi = hi
    if HAS_TABLE:
        col = tab_ptr + b.to(tl.int64) * tab_sb + offs
        valid = offs < K
        lo = tl.maximum(lo, tl.load(col, mask=valid, other=0))
        hi = tl.minimum(hi, tl.load(col + tab_sc, mask=valid, other=0))
        flo = tl.maximum(flo, tl.load(col + 2 * tab_sc, mask=valid, other=0))
        fhi = tl.minimum(fhi, tl.load(col + 3 * tab_sc, mask=valid, other=0))
    return lo, hi, flo, fhi


@triton.jit
def _block_runs(valid, lo, hi, flo, fhi, limit, BLOCK: tl.constexpr):
    """Blocks to visit, as partial [b_start, f_start), full [f_start, f_end), partial [f_end, b_end).

    ``valid`` marks the rows whose results are kept; blocks outside [b_start, b_end) hold no kept
    pair of a valid row. A block is full when every valid row keeps all its (in-range) positions.
    """
    nonempty = valid & (lo < hi)
    start = tl.min(tl.where(nonempty, lo, limit), axis=0)
    end = tl.max(tl.where(nonempty, hi, 0), axis=0)
    b_start = start // BLOCK
    b_end = tl.maximum((end + BLOCK - 1) // BLOCK, b_start)
    f_lo = tl.max(tl.where(valid, flo, 0), axis=0)
    f_hi = tl.min(tl.where(valid, fhi, limit), axis=0)
    f_start = tl.minimum(tl.maximum((f_lo + BLOCK - 1) // BLOCK, b_start), b_end)
    f_end = tl.minimum(tl.maximum(f_hi // BLOCK, f_start), b_end)
    return b_start, f_start, f_end, b_end


@triton.jit
def _load_tile(base, offs, stride, n, offs_d, DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK: tl.constexpr):
    """Rows ``offs`` (< n when CHECK) of a (n, DIM) matrix, zero-padded to BLOCK_D columns."""
    ptrs = base + offs[:, None] * stride + offs_d[None, :]
    if CHECK:
        if DIM == BLOCK_D:
            tile = tl.load(ptrs, mask=(offs < n)[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=(offs < n)[:, None] & (offs_d < DIM)[None, :], other=0.0)
    else:
        if DIM == BLOCK_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=(offs_d < DIM)[None, :], other=0.0)
    return tile


@triton.jit
def _store_tile(base, tile, offs, stride, n, offs_d, DIM: tl.constexpr):
    ptrs = base + offs[:, None] * stride + offs_d[None, :]
    tl.store(ptrs, tile, mask=(offs < n)[:, None] & (offs_d < DIM)[None, :])


@triton.jit
def _fwd_run(acc, l_i, m_i, q, k_base, v_base, z_base, kd_base, skn, svn, offs_m, lo, hi, qd, exact,
             K, start, end, scale_log2, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
             BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
             HAS_GATE: tl.constexpr, GATE_LOG2: tl.constexpr, DOC_CHECK: tl.constexpr, MASKED: tl.constexpr,
             PREC: tl.constexpr):
    """Online-softmax update of one query block over key blocks [start, end).

    ``z_base`` holds the raw gate z, or its log2 when GATE_LOG2 (then no log2 is taken per tile: in the
    MMA layout each gate value would be recomputed by every thread holding its column). DOC_CHECK
    compares document ids in partial blocks (off when every batch's key intervals are exact).
    """
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for kb in range(start, end):
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, skn, K, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        if HAS_GATE:  # log2 z (log2 0 = -inf removes the key); out-of-range keys read z = 1 (log2 z = 0)
            if MASKED:
                z = tl.load(z_base + offs_n, mask=offs_n < K, other=0.0 if GATE_LOG2 else 1.0)
            else:
                z = tl.load(z_base + offs_n)
            if not GATE_LOG2:
                z = tl.log2(z)
            s = tl.fma(qk, scale_log2, z[None, :])  # one instruction per score, not a multiply and an add
        else:
            s = qk * scale_log2
        if MASKED:
            keep = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] < hi[:, None])
            if DOC_CHECK:
                kd = tl.load(kd_base + offs_n, mask=offs_n < K, other=0)
                keep = keep & ((qd[:, None] == kd[None, :]) | (exact != 0))
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_tile(v_base, offs_n, svn, K, offs_dv, HEAD_DIM_V, BLOCK_DV, MASKED)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)  # accumulates in the MMA's registers
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=_NO_SPEC)
def attn_fwd(Qp, Kp, Vp, Zp, Op, LSEp, PREFIXp, ROWp, QDp, KDp, EXACTp, COUNTp,
             sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, row_sb, row_sc,
             H, GROUP, Q, K, causal, window, chunk, scale_log2,
             HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_GATE: tl.constexpr, HAS_PREFIX: tl.constexpr,
             HAS_TABLE: tl.constexpr, COUNT: tl.constexpr, PREC: tl.constexpr, GATE_LOG2: tl.constexpr = False,
             SPLIT: tl.constexpr = True, DOC_CHECK: tl.constexpr = True):
    """Output O (B, H, Q, Dv) and lse2 (B, H, Q) float32 of one (query block, batch*head) program.

    ``Zp`` is the gate z (B, K) float32, or log2 z when GATE_LOG2. DOC_CHECK False (with a table)
    promises that every batch's intervals are exact, so no document ids are compared. SPLIT visits the key blocks in
    partial / full / partial runs (the mask is evaluated in partial blocks only); otherwise in one
    run that evaluates the mask in every block (fewer loop prologues when the runs are short, as in
    sliding windows). Query blocks are taken last first, so with a causal mask the longest rows
    start first and the short ones fill the tail of the launch (as FlashAttention-2 does).
    """
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    b64 = b.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(Qp + b64 * sqb + h * sqh, offs_m, sqm, Q, offs_d, HEAD_DIM, BLOCK_D, True)
    lo, hi, flo, fhi = _row_bounds(offs_m, b, Q, K, causal, window, chunk, PREFIXp, ROWp, row_sb, row_sc,
                                   HAS_PREFIX, HAS_TABLE)
    b_start, f_start, f_end, b_end = _block_runs(offs_m < Q, lo, hi, flo, fhi, K, BLOCK_N)
    if HAS_TABLE:
        qd = tl.load(QDp + b64 * Q + offs_m, mask=offs_m < Q, other=0)
        exact = tl.load(EXACTp + b)
    else:
        qd = offs_m
        exact = 1
    k_base = Kp + b64 * skb + hk * skh
    v_base = Vp + b64 * svb + hk * svh
    z_base = Zp + b64 * K
    kd_base = KDp + b64 * K
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if SPLIT:
        acc, l_i, m_i = _fwd_run(acc, l_i, m_i, q, k_base, v_base, z_base, kd_base, skn, svn, offs_m, lo, hi, qd,
                                 exact, K, b_start, f_start, scale_log2, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
                                 BLOCK_N, HAS_GATE, GATE_LOG2, HAS_TABLE and DOC_CHECK, True, PREC)
        acc, l_i, m_i = _fwd_run(acc, l_i, m_i, q, k_base, v_base, z_base, kd_base, skn, svn, offs_m, lo, hi, qd,
                                 exact, K, f_start, f_end, scale_log2, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
                                 BLOCK_N, HAS_GATE, GATE_LOG2, HAS_TABLE and DOC_CHECK, False, PREC)
        acc, l_i, m_i = _fwd_run(acc, l_i, m_i, q, k_base, v_base, z_base, kd_base, skn, svn, offs_m, lo, hi, qd,
                                 exact, K, f_end, b_end, scale_log2, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
                                 BLOCK_N, HAS_GATE, GATE_LOG2, HAS_TABLE and DOC_CHECK, True, PREC)
    else:
        acc, l_i, m_i = _fwd_run(acc, l_i, m_i, q, k_base, v_base, z_base, kd_base, skn, svn, offs_m, lo, hi, qd,
                                 exact, K, b_start, b_end, scale_log2, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
                                 BLOCK_N, HAS_GATE, GATE_LOG2, HAS_TABLE and DOC_CHECK, True, PREC)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    _store_tile(Op + b64 * sob + h * soh, out.to(Op.dtype.element_ty), offs_m, som, Q, offs_dv, HEAD_DIM_V)
    tl.store(LSEp + pid_bh.to(tl.int64) * Q + offs_m, lse2, mask=offs_m < Q)
    if COUNT:
        slot = COUNTp + (pid_bh * tl.num_programs(0) + pid_m) * 2
        tl.store(slot, b_end - b_start)
        tl.store(slot + 1, f_end - f_start)


@triton.jit
def attn_bwd_delta(Op, DOp, DELTAp, sob, soh, som, sdb, sdh, sdm, H, Q,
                   HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] in float32 (FlashAttention-2 preprocessing)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    o = _load_tile(Op + b * sob + h * soh, offs_m, som, Q, offs_dv, HEAD_DIM_V, BLOCK_DV, True)
    do = _load_tile(DOp + b * sdb + h * sdh, offs_m, sdm, Q, offs_dv, HEAD_DIM_V, BLOCK_DV, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTAp + pid_bh.to(tl.int64) * Q + offs_m, delta, mask=offs_m < Q)


def triton_imported_interpreted() -> bool:
    """Whether triton itself was imported under ``TRITON_INTERPRET=1`` (its library is interpreted)."""
    return isinstance(tl.standard.cdiv, InterpretedFunction)


INTERPRETED: bool = isinstance(attn_fwd, InterpretedFunction)
"""True when these kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
if INTERPRETED != triton_imported_interpreted():
    raise ImportError("TRITON_INTERPRET changed between `import triton` and the import of "
                      f"{__name__}; set it before triton is first imported and leave it set")

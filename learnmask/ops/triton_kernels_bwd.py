"""Backward Triton kernels of the fused masked attention (FlashAttention-2, Dao 2023).

Two launches: first one program per (query block, batch*head) computes FlashAttention-2's
``delta = rowsum(dO * O)`` of its rows (stored) and accumulates dQ; then one program per
(key block, batch*kv head) accumulates dK, dV and the per-key gate gradient over the query blocks of
every query head of its group (no atomics). When dQ is not needed,
:func:`learnmask.ops.triton_kernels.attn_bwd_delta` computes delta instead. Both visit only the
blocks the forward visits, in the same partial / full / partial
runs, and recompute ``p = exp2(s2 - lse2)`` (zero for a row with no kept key, whose ``lse2`` is
``+inf``). With ``ds = p * (dp - delta)`` in natural units: ``dQ = scale * ds @ K``,
``dK = scale * ds^T @ Q``, ``dV = p^T @ dO`` and ``dbias[j] = sum_i ds[i, j]`` (the gradient of the
``log z[j]`` added to the scores), stored as the gate gradient ``dbias[j] / z[j]``.

Legend: see :mod:`learnmask.ops.triton_kernels`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from learnmask.ops.triton_kernels import _NO_SPEC, _block_runs, _col_bounds, _load_tile, _row_bounds, _store_tile


@triton.jit
def _dq_run(dq, q, do, lse2, delta, k_base, v_base, z_base, kd_base, skn, svn, offs_m, lo, hi, qd, exact,
            K, start, end, scale_log2, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, HAS_GATE: tl.constexpr, HAS_TABLE: tl.constexpr,
            MASKED: tl.constexpr, PREC: tl.constexpr, GATE_LOG2: tl.constexpr):
    """dQ of one query block accumulated over key blocks [start, end) (unscaled); ``z_base`` holds z,
    or log2 z when GATE_LOG2."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for kb in range(start, end):
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, skn, K, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        v = _load_tile(v_base, offs_n, svn, K, offs_dv, HEAD_DIM_V, BLOCK_DV, MASKED)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        if HAS_GATE:
            if MASKED:
                z = tl.load(z_base + offs_n, mask=offs_n < K, other=0.0 if GATE_LOG2 else 1.0)
            else:
                z = tl.load(z_base + offs_n)
            if not GATE_LOG2:
                z = tl.log2(z)
            s = tl.fma(qk, scale_log2, z[None, :])
        else:
            s = qk * scale_log2
        if MASKED:
            keep = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] < hi[:, None])
            if HAS_TABLE:
                kd = tl.load(kd_base + offs_n, mask=offs_n < K, other=0)
                keep = keep & ((qd[:, None] == kd[None, :]) | (exact != 0))
            s = tl.where(keep, s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.jit(do_not_specialize=_NO_SPEC)
def attn_bwd_dq(Qp, Kp, Vp, Zp, Op, DOp, LSEp, DELTAp, DQp, PREFIXp, ROWp, QDp, KDp, EXACTp,
                sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, sdb, sdh, sdm, sdqb, sdqh, sdqm,
                row_sb, row_sc,
                H, GROUP, Q, K, causal, window, chunk, scale, scale_log2,
                HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_GATE: tl.constexpr, HAS_PREFIX: tl.constexpr,
                HAS_TABLE: tl.constexpr, PREC: tl.constexpr, GATE_LOG2: tl.constexpr = False):
    """dQ (B, H, Q, D) and delta (B, H, Q) of one (query block, batch*head) program.

    ``Zp`` is the gate z (B, K) float32, or log2 z when GATE_LOG2 (the forward's, saved).

    delta = rowsum(dO * O) (FlashAttention-2's preprocessing) is computed here from the block's O and
    dO tiles and stored for the dK/dV kernel, which is launched after this one on the same stream.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    b64 = b.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(Qp + b64 * sqb + h * sqh, offs_m, sqm, Q, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DOp + b64 * sdb + h * sdh, offs_m, sdm, Q, offs_dv, HEAD_DIM_V, BLOCK_DV, True)
    o = _load_tile(Op + b64 * sob + h * soh, offs_m, som, Q, offs_dv, HEAD_DIM_V, BLOCK_DV, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    row = pid_bh.to(tl.int64) * Q + offs_m
    tl.store(DELTAp + row, delta, mask=offs_m < Q)
    lse2 = tl.load(LSEp + row, mask=offs_m < Q, other=float("inf"))
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
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _dq_run(dq, q, do, lse2, delta, k_base, v_base, Zp + b64 * K, KDp + b64 * K, skn, svn, offs_m, lo, hi,
                 qd, exact, K, b_start, f_start, scale_log2, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N,
                 HAS_GATE, HAS_TABLE, True, PREC, GATE_LOG2)
    dq = _dq_run(dq, q, do, lse2, delta, k_base, v_base, Zp + b64 * K, KDp + b64 * K, skn, svn, offs_m, lo, hi,
                 qd, exact, K, f_start, f_end, scale_log2, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N,
                 HAS_GATE, HAS_TABLE, False, PREC, GATE_LOG2)
    dq = _dq_run(dq, q, do, lse2, delta, k_base, v_base, Zp + b64 * K, KDp + b64 * K, skn, svn, offs_m, lo, hi,
                 qd, exact, K, f_end, b_end, scale_log2, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N,
                 HAS_GATE, HAS_TABLE, True, PREC, GATE_LOG2)
    _store_tile(DQp + b64 * sdqb + h * sdqh, (dq * scale).to(DQp.dtype.element_ty), offs_m, sdqm, Q, offs_d, HEAD_DIM)


@triton.jit
def _dkdv_run(dk, dv, dbias, k, v, log2z, kd, exact, q_base, do_base, lse_base, delta_base, qd_base, sqm, sdm,
              offs_n, b, Q, K, causal, window, chunk, prefix_ptr, row_ptr, row_sb, row_sc, start, end, scale_log2,
              HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_M: tl.constexpr, HAS_GATE: tl.constexpr, HAS_PREFIX: tl.constexpr,
              HAS_TABLE: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    """dK, dV and dbias of one key block accumulated over query blocks [start, end) of one head."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for mb in range(start, end):
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        q = _load_tile(q_base, offs_m, sqm, Q, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        do = _load_tile(do_base, offs_m, sdm, Q, offs_dv, HEAD_DIM_V, BLOCK_DV, MASKED)
        if MASKED:
            lse2 = tl.load(lse_base + offs_m, mask=offs_m < Q, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=offs_m < Q, other=0.0)
        else:
            lse2 = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * scale_log2
        if HAS_GATE:
            s_t += log2z[:, None]
        if MASKED:
            lo, hi, flo, fhi = _row_bounds(offs_m, b, Q, K, causal, window, chunk, prefix_ptr, row_ptr, row_sb,
                                           row_sc, HAS_PREFIX, HAS_TABLE)
            keep = (offs_n[:, None] >= lo[None, :]) & (offs_n[:, None] < hi[None, :])
            if HAS_TABLE:
                qd = tl.load(qd_base + offs_m, mask=offs_m < Q, other=0)
                keep = keep & ((kd[:, None] == qd[None, :]) | (exact != 0))
            s_t = tl.where(keep, s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse2[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)
        if HAS_GATE:
            dbias += tl.sum(ds_t, axis=1)
    return dk, dv, dbias


@triton.jit(do_not_specialize=_NO_SPEC)
def attn_bwd_dkdv(Qp, Kp, Vp, Zp, DOp, LSEp, DELTAp, DKp, DVp, DZp, PREFIXp, ROWp, COLp, QDp, KDp, EXACTp, COUNTp,
                  sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
                  row_sb, row_sc, col_sb, col_sc, H, GROUP, Q, K, causal, window, chunk, scale, scale_log2,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_GATE: tl.constexpr, HAS_PREFIX: tl.constexpr,
                  HAS_TABLE: tl.constexpr, COUNT: tl.constexpr, PREC: tl.constexpr):
    """dK (B, Hkv, K, D), dV (B, Hkv, K, Dv) and the gate gradient of one (key block, batch*kv head).

    The gate gradient per kv head is ``dbias / z`` (0 where z == 0: a removed key has no gradient),
    stored in DZp (B, Hkv, K) float32; the launcher sums it over kv heads.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n_kv_heads = H // GROUP
    b = pid_bh // n_kv_heads
    hk = pid_bh % n_kv_heads
    b64 = b.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_tile(Kp + b64 * skb + hk * skh, offs_n, skn, K, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load_tile(Vp + b64 * svb + hk * svh, offs_n, svn, K, offs_dv, HEAD_DIM_V, BLOCK_DV, True)
    if HAS_GATE:
        zk = tl.load(Zp + b64 * K + offs_n, mask=offs_n < K, other=1.0)
        log2z = tl.log2(zk)
    else:
        zk = tl.full([BLOCK_N], 1.0, tl.float32)
        log2z = tl.zeros([BLOCK_N], tl.float32)
    if HAS_TABLE:
        kd = tl.load(KDp + b64 * K + offs_n, mask=offs_n < K, other=0)
        exact = tl.load(EXACTp + b)
    else:
        kd = offs_n
        exact = 1
    lo, hi, flo, fhi = _col_bounds(offs_n, b, Q, K, causal, window, chunk, PREFIXp, COLp, col_sb, col_sc,
                                   HAS_PREFIX, HAS_TABLE)
    b_start, f_start, f_end, b_end = _block_runs(offs_n < K, lo, hi, flo, fhi, Q, BLOCK_M)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    dbias = tl.zeros([BLOCK_N], tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = Qp + b64 * sqb + h * sqh
        do_base = DOp + b64 * sdb + h * sdh
        row = (b64 * H + h) * Q
        dk, dv, dbias = _dkdv_run(dk, dv, dbias, k, v, log2z, kd, exact, q_base, do_base, LSEp + row, DELTAp + row,
                                  QDp + b64 * Q, sqm, sdm, offs_n, b, Q, K, causal, window, chunk, PREFIXp, ROWp,
                                  row_sb, row_sc, b_start, f_start, scale_log2, HEAD_DIM, HEAD_DIM_V, BLOCK_D,
                                  BLOCK_DV, BLOCK_M, HAS_GATE, HAS_PREFIX, HAS_TABLE, True, PREC)
        dk, dv, dbias = _dkdv_run(dk, dv, dbias, k, v, log2z, kd, exact, q_base, do_base, LSEp + row, DELTAp + row,
                                  QDp + b64 * Q, sqm, sdm, offs_n, b, Q, K, causal, window, chunk, PREFIXp, ROWp,
                                  row_sb, row_sc, f_start, f_end, scale_log2, HEAD_DIM, HEAD_DIM_V, BLOCK_D,
                                  BLOCK_DV, BLOCK_M, HAS_GATE, HAS_PREFIX, HAS_TABLE, False, PREC)
        dk, dv, dbias = _dkdv_run(dk, dv, dbias, k, v, log2z, kd, exact, q_base, do_base, LSEp + row, DELTAp + row,
                                  QDp + b64 * Q, sqm, sdm, offs_n, b, Q, K, causal, window, chunk, PREFIXp, ROWp,
                                  row_sb, row_sc, f_end, b_end, scale_log2, HEAD_DIM, HEAD_DIM_V, BLOCK_D,
                                  BLOCK_DV, BLOCK_M, HAS_GATE, HAS_PREFIX, HAS_TABLE, True, PREC)
    _store_tile(DKp + b64 * sdkb + hk * sdkh, (dk * scale).to(DKp.dtype.element_ty), offs_n, sdkn, K, offs_d, HEAD_DIM)
    _store_tile(DVp + b64 * sdvb + hk * sdvh, dv.to(DVp.dtype.element_ty), offs_n, sdvn, K, offs_dv, HEAD_DIM_V)
    if HAS_GATE:
        dz = tl.where(zk > 0, dbias / tl.where(zk > 0, zk, 1.0), 0.0)
        tl.store(DZp + pid_bh.to(tl.int64) * K + offs_n, dz, mask=offs_n < K)
    if COUNT:
        slot = COUNTp + (pid_bh * tl.num_programs(0) + pid_n) * 2
        tl.store(slot, b_end - b_start)
        tl.store(slot + 1, f_end - f_start)

"""Launching the fused masked-attention kernels: per-row interval tables, tuning, autograd.

Imported only when the ``triton`` backend runs (it imports triton and the kernels). Everything the
kernels read about the mask comes from the :class:`~learnmask.masks.structure.MaskStructure`: the
position conditions as integers (:meth:`~learnmask.masks.structure.MaskStructure.kernel_scalars`,
restated in Triton by ``_row_bounds`` / ``_col_bounds``) and the key conditions as per-row key spans
and per-key query spans (:func:`interval_tables`, from
:func:`learnmask.masks.structure_blocks.key_spans`), computed with vectorised torch ops and cached
per :class:`MaskStructure` object (like a FlexAttention ``BlockMask`` that is built once and reused
across layers and steps).

Host work per call is kept small, because at small shapes the GPU finishes a kernel faster than
Python launches it: everything that depends only on the structure, the shapes, the dtype and the
scale (tables, constexpr flags, scalar arguments, the tile configuration) is computed once and
cached in a :class:`LaunchPlan`; a forward is two allocations and one launch, a backward is a few
allocations, two launches and (with a gate on several kv heads) one sum. The gate's log2 is taken
inside the kernels for small problems (one torch op before the forward from
``GATE_LOG2_MIN_SCORES`` scores up), delta = rowsum(dO * O) inside the dQ kernel and the gate
gradient dbias / z inside the dK/dV kernel. Tile configurations are chosen once per tuning key (:func:`_tune`) by
timing each candidate, then the plain jitted kernel is launched (no ``triton.autotune`` dispatch per
call).

Legend: B batch, H query heads, Hkv key/value heads, Q query length, K key length, D head dim,
Dv value head dim.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import triton
from torch import Tensor
from torch.autograd.function import once_differentiable

from learnmask.masks.structure import MaskStructure
from learnmask.masks.structure_blocks import key_spans
from learnmask.ops import triton_kernels as fwd_kernels
from learnmask.ops import triton_kernels_bwd as bwd_kernels

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


def interval_tables(structure: MaskStructure, batch: int, q_len: int, kv_len: int,
                    device: torch.device) -> IntervalTables | None:
    """Interval tables of the documents and key padding of ``structure``; None when it has neither.

    Derived from :func:`learnmask.masks.structure_blocks.key_spans` (the key conditions as the
    tightest span per query and per key): sorted (packed) documents and a single run of real keys
    give exact spans, so kernels visit only the key blocks of a query block's documents; anything
    else is still correct, with an elementwise document check in the visited blocks.
    """
    spans = key_spans(structure, q_len, kv_len, device)
    if spans is None:
        return None
    (r_lo, r_hi, r_exact), (c_lo, c_hi, c_exact) = ((_per_batch(t, batch, device, t.dtype) for t in side)
                                                    for side in spans)
    if structure.q_document_ids is not None:
        q_doc = _per_batch(structure.q_document_ids, batch, device, torch.int64)
        kv_doc = _per_batch(structure.kv_document_ids, batch, device, torch.int64)
    else:
        q_doc = torch.zeros(batch, q_len, dtype=torch.int64, device=device)
        kv_doc = torch.zeros(batch, kv_len, dtype=torch.int64, device=device)
    if structure.key_padding is not None:
        kv_doc = torch.where(_per_batch(structure.key_padding, batch, device, torch.bool), kv_doc, DOC_SENTINEL)
    rows = torch.stack([r_lo, r_hi, torch.where(r_exact, r_lo, 0), torch.where(r_exact, r_hi, 0)], dim=1)
    cols = torch.stack([c_lo, c_hi, torch.where(c_exact, c_lo, 0), torch.where(c_exact, c_hi, 0)], dim=1)
    exact = r_exact.all(dim=1)
    return IntervalTables(rows.to(torch.int32).contiguous(), cols.to(torch.int32).contiguous(), q_doc.contiguous(),
                          kv_doc.contiguous(), exact.to(torch.int32))


_CACHE: "weakref.WeakKeyDictionary[MaskStructure, dict]" = weakref.WeakKeyDictionary()
_PLANS_PER_STRUCTURE = 16


def _fingerprint(t: Tensor | None):
    return None if t is None else (t.data_ptr(), t._version, t.shape)


def _structure_tables(structure: MaskStructure, batch: int, q_len: int, kv_len: int, device: torch.device):
    prefix = None
    if structure.causal and structure.prefix_lengths is not None:
        prefix = _per_batch(structure.prefix_lengths.reshape(-1, 1), batch, device, torch.int32).reshape(batch)
    return prefix, interval_tables(structure, batch, q_len, kv_len, device)


def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@dataclass(frozen=True, eq=False)
class LaunchPlan:
    """Everything the kernels need besides q, k, v, the gate and the outputs, for one structure,
    shape, dtype and scale (built once, cached per structure). ``blocks`` None means tuned (CUDA)."""

    causal: int
    window: int
    chunk: int
    prefix: Tensor | None
    tables: IntervalTables | None
    scale: float
    blocks: tuple[int, int] | None
    dummy: Tensor
    pointers: tuple  # PREFIXp, ROWp, QDp, KDp, EXACTp (dummy where absent)
    cols: Tensor
    row_strides: tuple[int, int]
    col_strides: tuple[int, int]
    meta: dict  # constexpr flags (all but the block sizes and COUNT)
    fwd_meta: dict  # meta plus the forward kernel's own flags (GATE_LOG2, DOC_CHECK)
    scalars: dict  # H, GROUP, Q, K, causal, window, chunk
    tune_key: tuple
    tables_key: tuple  # (B, Q, K, device) the tables were built for

    @classmethod
    def build(cls, structure: MaskStructure, q: Tensor, k: Tensor, v: Tensor, scale: float,
              blocks: tuple[int, int] | None, has_gate: bool) -> "LaunchPlan":
        """The cached plan for these inputs (the shapes, dtype and device of q, k, v)."""
        batch, heads, q_len, dim = q.shape
        _, kv_heads, kv_len, dim_v = v.shape
        return _cached_plan(structure, batch, heads, kv_heads, q_len, kv_len, dim, dim_v, q.dtype, q.device,
                            float(scale), blocks, has_gate)


def _cached_plan(structure, batch, heads, kv_heads, q_len, kv_len, dim, dim_v, dtype, device, scale, blocks,
                 has_gate) -> LaunchPlan:
    """The plan cached per structure object; the key holds each structure tensor's storage and version
    counter, so an in-place edit of a structure tensor recomputes the tables."""
    key = (batch, heads, kv_heads, q_len, kv_len, dim, dim_v, dtype, device, scale, blocks, has_gate)
    fingerprint = (_fingerprint(structure.prefix_lengths), _fingerprint(structure.q_document_ids),
                   _fingerprint(structure.kv_document_ids), _fingerprint(structure.key_padding))
    per_structure = _CACHE.get(structure)
    if per_structure is None:
        per_structure = _CACHE.setdefault(structure, {})
    entry = per_structure.get(key)
    if entry is not None and entry[0] == fingerprint:
        return entry[1]
    if entry is not None:  # a structure tensor was edited in place: every cached table is stale
        per_structure.clear()
    tables = None
    for old_fingerprint, old_plan in per_structure.values():  # same structure, other dtype/heads: reuse tables
        if old_fingerprint == fingerprint and old_plan.tables_key == (batch, q_len, kv_len, device):
            tables = (old_plan.prefix, old_plan.tables)
            break
    if tables is None:
        tables = _structure_tables(structure, batch, q_len, kv_len, device)
    if len(per_structure) >= _PLANS_PER_STRUCTURE:
        per_structure.clear()
    plan = _make_plan(structure, batch, heads, kv_heads, q_len, kv_len, dim, dim_v, dtype, device, scale, blocks,
                      has_gate, *tables)
    per_structure[key] = (fingerprint, plan)
    return plan


def _make_plan(structure, batch, heads, kv_heads, q_len, kv_len, dim, dim_v, dtype, device, scale, blocks, has_gate,
               prefix, tables) -> LaunchPlan:
    position = structure.kernel_scalars(q_len, kv_len)  # the kernel restates these in _row_bounds/_col_bounds
    window, chunk = position["window"], position["chunk"]
    dummy = torch.zeros(1, dtype=torch.float32, device=device)
    t = tables
    pointers = (dummy if prefix is None else prefix, dummy if t is None else t.rows, dummy if t is None else t.q_doc,
                dummy if t is None else t.kv_doc, dummy if t is None else t.exact)
    meta = dict(HEAD_DIM=dim, HEAD_DIM_V=dim_v, BLOCK_D=_pad_dim(dim), BLOCK_DV=_pad_dim(dim_v), HAS_GATE=has_gate,
                HAS_PREFIX=prefix is not None, HAS_TABLE=t is not None, PREC=_dot_precision(dtype))
    gate_log2 = has_gate and batch * heads * q_len * kv_len >= GATE_LOG2_MIN_SCORES
    # one host sync per plan (plans are cached): with every batch's intervals exact, partial blocks
    # need no document-id comparison
    doc_check = t is not None and not bool(t.exact.all())
    fwd_meta = dict(meta, GATE_LOG2=gate_log2, DOC_CHECK=doc_check)
    scalars = dict(H=heads, GROUP=heads // kv_heads, Q=q_len, K=kv_len, **position)
    tune_key = (_bucket(q_len), _bucket(kv_len), _bucket(batch * heads), heads // kv_heads, dim, dim_v, str(dtype),
                has_gate, prefix is not None, t is not None, position["causal"], window > 0, chunk > 0, gate_log2,
                doc_check)
    return LaunchPlan(position["causal"], window, chunk, prefix, t, scale, blocks, dummy, pointers,
                      dummy if t is None else t.cols,
                      (0, 0) if t is None else (t.rows.stride(0), t.rows.stride(1)),
                      (0, 0) if t is None else (t.cols.stride(0), t.cols.stride(1)), meta, fwd_meta, scalars, tune_key,
                      (batch, q_len, kv_len, device))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _pad_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


# (BLOCK_M, BLOCK_N, num_warps, num_stages), the first the preferred one on ties. Checked offline
# for sm_90 at D = 64 with ptxas (triton 3.9; fwd with the log2 gate): no spills beyond 8 bytes
# (cuobjdump --dump-resource-usage: STACK). Left out for spilling:
# dK/dV (32, 64, 4), (128, 64, 8); fwd (64, 128, 4), (128, 128, 4) (flex's choice; ~450 bytes of
# spills here). BLOCK 32 variants give small or sparse problems (short sequences, windows) more programs.
# Forward configurations add SPLIT (see attn_fwd): True runs partial / full / partial blocks, False
# one run with the mask in every block (one loop prologue instead of three: short runs, windows).
FWD_CONFIGS = [(128, 64, 4, 3, True), (128, 128, 8, 3, True), (128, 64, 4, 3, False), (128, 128, 8, 3, False),
               (64, 64, 4, 3, True), (128, 64, 4, 4, True)]
GATE_LOG2_MIN_SCORES = 1 << 22
"""From B * H * Q * K scores up, the forward takes log2 of the token gate in one small torch op and
passes it to the forward and dQ kernels: taken inside them, each value is recomputed by every thread
holding its column of a tile (in software, ``__nv_log2f``): ~40% of the instructions of an
unmasked 128 x 64 tile. Below, the extra launch would cost more than it saves."""
DKDV_CONFIGS = [(64, 64, 4, 3), (64, 128, 8, 3), (64, 32, 4, 3)]
DQ_CONFIGS = [(64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3)]
TUNE_WARMUP_MS = 10
TUNE_REP_MS = 40
TIE = 1.03
"""A candidate replaces the preferred (earlier) one only when it is more than 3% faster."""

CHOSEN: dict[tuple, tuple] = {}
"""Tuning key -> chosen (BLOCK_M, BLOCK_N, num_warps, num_stages) (forward: plus SPLIT), per kernel
(read by the benchmark)."""
TIMINGS: dict[tuple, dict] = {}
"""Tuning key -> {config: median ms} of the timing that chose it."""


def _tune(key: tuple, configs: list, launch) -> tuple:
    """Time ``launch(config)`` for each config (median of ``do_bench``) and keep the fastest."""
    import triton.testing

    timings = {}
    for config in configs:
        try:
            launch(config)  # compiles
            timings[config] = triton.testing.do_bench(lambda config=config: launch(config), warmup=TUNE_WARMUP_MS,
                                                      rep=TUNE_REP_MS, return_mode="median")
        except Exception as error:  # noqa: BLE001 - e.g. out of shared memory on a smaller GPU
            timings[config] = f"{type(error).__name__}: {error}"[:200]
    timed = [(ms, i, c) for i, (c, ms) in enumerate(timings.items()) if isinstance(ms, float)]
    if not timed:
        raise RuntimeError(f"no kernel configuration ran for {key}: {timings}")
    best_ms = min(ms for ms, _, _ in timed)
    chosen = min((i, c) for ms, i, c in timed if ms <= best_ms * TIE)[1]
    TIMINGS[key] = {str(c): ms for c, ms in timings.items()}
    CHOSEN[key] = chosen
    return chosen


def gate_for_kernels(z: Tensor | None, plan: LaunchPlan) -> Tensor | None:
    """What the forward and dQ kernels read as the gate: z itself, or log2 z (B, K) float32 when the plan
    says so (``plan.fwd_meta["GATE_LOG2"]``; log2 0 = -inf removes the key, as in the kernels)."""
    if z is None or not plan.fwd_meta["GATE_LOG2"]:
        return z
    return torch.log2(z)


def forward(q: Tensor, k: Tensor, v: Tensor, z: Tensor | None, plan: LaunchPlan,
            count: Tensor | None = None, config: tuple | None = None) -> tuple[Tensor, Tensor]:
    """Output (B, H, Q, Dv) in q's dtype and lse2 (B, H, Q) float32 (+inf for rows keeping nothing).

    ``z`` is what :func:`gate_for_kernels` returns for the token gate (B, K) float32 contiguous, or None
    (then ``plan`` was built without gate). ``config`` (BLOCK_M, BLOCK_N, num_warps, num_stages, SPLIT)
    overrides the plan's tile configuration (for tests).
    """
    batch, heads, q_len, _ = q.shape
    out = torch.empty(batch, heads, q_len, v.shape[3], dtype=q.dtype, device=q.device)
    lse2 = torch.empty(batch, heads, q_len, dtype=torch.float32, device=q.device)
    dummy = plan.dummy
    sq, sk, sv, so = q.stride(), k.stride(), v.stride(), out.stride()
    args = (q, k, v, dummy if z is None else z, out, lse2, *plan.pointers, dummy if count is None else count,
            sq[0], sq[1], sq[2], sk[0], sk[1], sk[2], sv[0], sv[1], sv[2], so[0], so[1], so[2], *plan.row_strides)
    scale_log2 = plan.scale * LOG2E
    counting = count is not None

    def launch(config):
        block_m, block_n, warps, stages, split = config
        fwd_kernels.attn_fwd[(triton.cdiv(q_len, block_m), batch * heads)](
            *args, **plan.scalars, scale_log2=scale_log2, **plan.fwd_meta, BLOCK_M=block_m, BLOCK_N=block_n,
            COUNT=counting, SPLIT=split, num_warps=warps, num_stages=stages)

    if config is not None:
        launch(config)
    elif plan.blocks is not None:
        launch((*plan.blocks, 4, 2, True))
    else:
        key = ("fwd",) + plan.tune_key
        launch(CHOSEN.get(key) or _tune(key, FWD_CONFIGS, launch))
    return out, lse2


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, z: Tensor | None, out: Tensor, lse2: Tensor,
             plan: LaunchPlan, need_dq: bool = True, need_dkdv: bool = True, count: Tensor | None = None,
             z_kernel: Tensor | None = None):
    """(dq, dk, dv, dz_heads): dz_heads (B, Hkv, K) float32 is the gate gradient per kv head (sum it
    over kv heads for dz; None without gate).

    ``z_kernel`` is the forward's :func:`gate_for_kernels` of z (read by the dQ kernel; None: z).
    A gradient that is not needed is None and its kernel is not launched.
    """
    batch, heads, q_len, _ = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    delta = torch.empty_like(lse2)
    dummy = plan.dummy
    zp = dummy if z is None else z
    scales = dict(scale=plan.scale, scale_log2=plan.scale * LOG2E)
    sq, sk, sv, so, sd = q.stride(), k.stride(), v.stride(), out.stride(), grad_out.stride()
    prefix_p, row_p, qd_p, kd_p, exact_p = plan.pointers
    fixed = plan.blocks is not None
    dq = None
    if need_dq:
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        sdq = dq.stride()
        gate_log2 = z is not None and z_kernel is not None and plan.fwd_meta["GATE_LOG2"]
        dq_args = (q, k, v, z_kernel if gate_log2 else zp, out, grad_out, lse2, delta, dq, prefix_p, row_p, qd_p,
                   kd_p, exact_p,
                   sq[0], sq[1], sq[2], sk[0], sk[1], sk[2], sv[0], sv[1], sv[2], so[0], so[1], so[2],
                   sd[0], sd[1], sd[2], sdq[0], sdq[1], sdq[2], *plan.row_strides)

        def launch_dq(config):
            block_m, block_n, warps, stages = config
            bwd_kernels.attn_bwd_dq[(triton.cdiv(q_len, block_m), batch * heads)](
                *dq_args, **plan.scalars, **scales, **plan.meta, BLOCK_M=block_m, BLOCK_N=block_n,
                GATE_LOG2=gate_log2, num_warps=warps, num_stages=stages)

        if fixed:
            launch_dq((*plan.blocks, 4, 2))
        else:
            key = ("dq",) + plan.tune_key
            launch_dq(CHOSEN.get(key) or _tune(key, DQ_CONFIGS, launch_dq))
    elif need_dkdv:  # delta comes from the dQ kernel when it runs
        block_delta = 16 if fixed else 64
        fwd_kernels.attn_bwd_delta[(triton.cdiv(q_len, block_delta), batch * heads)](
            out, grad_out, delta, so[0], so[1], so[2], sd[0], sd[1], sd[2], heads, q_len,
            HEAD_DIM_V=v.shape[3], BLOCK_DV=_pad_dim(v.shape[3]), BLOCK_M=block_delta)
    dk = dv = dz = None
    if need_dkdv:
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        dz = None if z is None else torch.empty(batch, kv_heads, kv_len, dtype=torch.float32, device=q.device)
        sdk, sdv = dk.stride(), dv.stride()
        dkdv_args = (q, k, v, zp, grad_out, lse2, delta, dk, dv, dummy if dz is None else dz, prefix_p, row_p,
                     plan.cols, qd_p, kd_p, exact_p, dummy if count is None else count,
                     sq[0], sq[1], sq[2], sk[0], sk[1], sk[2], sv[0], sv[1], sv[2], sd[0], sd[1], sd[2],
                     sdk[0], sdk[1], sdk[2], sdv[0], sdv[1], sdv[2], *plan.row_strides, *plan.col_strides)
        counting = count is not None

        def launch_dkdv(config):
            block_m, block_n, warps, stages = config
            bwd_kernels.attn_bwd_dkdv[(triton.cdiv(kv_len, block_n), batch * kv_heads)](
                *dkdv_args, **plan.scalars, **scales, **plan.meta, BLOCK_M=block_m, BLOCK_N=block_n,
                COUNT=counting, num_warps=warps, num_stages=stages)

        if fixed:
            launch_dkdv((*plan.blocks, 4, 2))
        else:
            key = ("dkdv",) + plan.tune_key
            launch_dkdv(CHOSEN.get(key) or _tune(key, DKDV_CONFIGS, launch_dkdv))
    return dq, dk, dv, dz


class FusedMaskedAttention(torch.autograd.Function):
    """Autograd of the fused kernel: forward saves lse2 per row; backward recomputes the scores.

    ``z`` is the token gate (B, K) float32 contiguous or None; its gradient is
    ``dbias / z`` where ``z > 0`` and 0 where ``z == 0`` (a removed key has no gradient), computed by
    the dK/dV kernel per kv head and summed here.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, z: Tensor | None, plan: LaunchPlan) -> Tensor:
        z_kernel = gate_for_kernels(z, plan)
        out, lse2 = forward(q, k, v, z_kernel, plan)
        ctx.save_for_backward(q, k, v, z, out, lse2, z_kernel)
        ctx.plan = plan
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k, v, z, out, lse2, z_kernel = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dq, dk, dv, dz_heads = backward(grad_out, q, k, v, z, out, lse2, ctx.plan, need_dq=needs[0],
                                        need_dkdv=needs[1] or needs[2] or needs[3], z_kernel=z_kernel)
        dz = None
        if z is not None and needs[3]:
            dz = dz_heads[:, 0] if dz_heads.shape[1] == 1 else dz_heads.sum(dim=1)
        return dq, dk, dv, dz, None

"""The forward and backward of the ``blocks`` backend (:mod:`learnmask.ops.blocks`) over a plan's groups.

Forward: one fused attention call per group on its gathered keys. Backward: PyTorch's fused CPU
flash backward per group when available and no gate needs a gradient; else the probabilities are
recomputed ``backward_rows`` rows at a time (in float32 for fp16/bf16) and dQ, dK, dV and d(log z)
accumulated, saving only q, k, v, the output and the log gate, never a (B, H, Q, K) tensor
(FlashAttention-style recomputation; Dao et al., 2022).

On CPU the forward computes each run of pieces of equal shape at fixed steps (a window's band, equal
documents) as one call over strided views (:mod:`learnmask.ops.block_runs`); the backward goes piece
by piece (one backward call over a run was measured slower: its key gradients leave the cache).
The calls are cut into two runs of consecutive calls of about equal work (groups holding
more than an eighth of the work are first cut by query rows, :func:`schedule`), and the runs go to
the two lanes of :mod:`learnmask.ops.cpu_pool` (which says why, and when they stay inline). Output
and dQ rows of different calls never overlap; key gradients go to one accumulator per run, over the
keys its calls read, added in run order — the same numbers in lanes or inline.

Legend: B batch, Hq query heads, Hkv key/value heads (G = Hq // Hkv), Q query length, K key length,
D head dim, Dv value head dim, L = k1 - k0 keys of one group, R rows of a sub-block.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Callable

import torch
from einops import rearrange
from torch import Tensor

from learnmask.ops import cpu_flash, cpu_pool
from learnmask.ops.block_runs import Run, runs, view
from learnmask.ops.row_plan import KVGroup
from learnmask.ops.sdpa import sdpa_with_mask

__all__ = ["BlockAttention", "TileFn", "schedule", "compute_dtype"]

# tile(b0, b1, q0, q1, k0, k1) -> bool keep-mask (b1-b0 | 1, Hq | 1, q1-q0 | 1, k1-k0), or None (all kept);
# a ``shared`` attribute, when True, says every mask it gives has batch and head dims 1
TileFn = Callable[[int, int, int, int, int, int], "Tensor | None"]

_PIECES_PER_WORKER = 4  # no call holds more than this fraction of a run's share of the work
_CALL_PAIRS = 16384     # a call's fixed cost, in (query, key) pairs, when splitting the calls
_CUT_ROWS = 32          # pieces of a cut group hold a multiple of this many query rows


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for fp16/bf16 (the backward's accumulation), else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _pairs(g: KVGroup) -> int:
    return (g.b1 - g.b0) * (g.q1 - g.q0) * (g.k1 - g.k0)


def schedule(groups: list[KVGroup], q: Tensor, v: Tensor) -> tuple[list[KVGroup], list[list[int]], bool]:
    """The groups that keep keys, cut by query rows where one would hold more than
    1 / (4 · LANES) of the work; the indices of each run of them (:func:`learnmask.ops.cpu_pool.split`,
    one run off the CPU); and whether the runs go to the lanes (else inline). The cut and the runs do
    not depend on where they run, so neither do the results.

    Args:
        q: (B, Hq, Q, D); v: (B, Hkv, K, Dv) — only their sizes and device are read.
    """
    busy = [g for g in groups if g.k1 > g.k0]
    total = sum(_pairs(g) for g in busy)
    in_lanes = cpu_pool.lanes(total * q.shape[1] * (q.shape[3] + v.shape[3]), q.device)
    parts = cpu_pool.LANES if q.device.type == "cpu" and len(busy) > 1 else 1
    if parts > 1:
        limit = total / (parts * _PIECES_PER_WORKER)
        busy = [piece for g in busy for piece in _cut(g, limit)]
    return busy, cpu_pool.split([_pairs(g) + _CALL_PAIRS for g in busy], parts), in_lanes


def _cut(g: KVGroup, limit: float) -> list[KVGroup]:
    """``g`` cut by query rows into pieces of about ``limit`` pairs at most (rows a multiple of 32)."""
    rows = g.q1 - g.q0
    n = min(-(-_pairs(g) // max(1, int(limit))), -(-rows // _CUT_ROWS))
    if n <= 1:
        return [g]
    size = -(-rows // (n * _CUT_ROWS)) * _CUT_ROWS
    return [replace(g, q0=r, q1=min(r + size, g.q1)) for r in range(g.q0, g.q1, size)]


def _key_span(pieces: list[KVGroup], part: list[int]) -> tuple[int, int]:
    return min(pieces[i].k0 for i in part), max(pieces[i].k1 for i in part)


def _combine(spans: list[tuple[int, Tensor | None]], shape: tuple[int, ...], dim: int) -> Tensor | None:
    """Per-worker accumulators over keys [k0, k0 + n) along ``dim`` added, in worker order, into one
    tensor of ``shape`` (zeros where no worker wrote)."""
    if spans[0][1] is None:
        return None
    first = spans[0][1]
    if len(spans) == 1 and first.shape == shape:
        return first
    total = first.new_zeros(shape)
    for k0, acc in spans:
        total.narrow(dim, k0, acc.shape[dim]).add_(acc)
    return total


class BlockAttention(torch.autograd.Function):
    """``BlockAttention.apply(q, k, v, lg, groups, tile, scale, backward_rows)`` -> (B, Hq, Q, Dv).

    q (B, Hq, Q, D), k (B, Hkv, K, D), v (B, Hkv, K, Dv); lg: (B, K) log token gate in the compute
    dtype, or None. Rows of groups with no key get 0.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, lg: Tensor | None, groups: list[KVGroup], tile: TileFn,
                scale: float, backward_rows: int) -> Tensor:
        fused = cpu_flash.available(q) and not (lg is not None and ctx.needs_input_grad[3])
        out = q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])
        for g in groups:
            if g.k0 == g.k1:
                out[g.b0:g.b1, :, g.q0:g.q1].zero_()  # no key kept
        pieces, parts, in_lanes = schedule(groups, q, v)
        lses: list[Tensor | None] = [None] * len(pieces)

        def forward_part(part: list[int]) -> None:
            for run in runs(pieces, part):
                if fused and run.n > 1 and _forward_run(run, q, k, v, lg, tile, scale, out, lses):
                    continue
                for i in run.indices:
                    g = pieces[i]
                    keep = None if g.full else tile(g.b0, g.b1, g.q0, g.q1, g.k0, g.k1)
                    lg_g = None if lg is None else lg[g.b0:g.b1, None, None, g.k0:g.k1]
                    qg, kg, vg = q[g.b0:g.b1, :, g.q0:g.q1], k[g.b0:g.b1, :, g.k0:g.k1], v[g.b0:g.b1, :, g.k0:g.k1]
                    if fused:
                        o, lses[i] = cpu_flash.forward(qg, kg, vg, cpu_flash.float_mask(keep, lg_g, q.dtype), scale)
                    else:
                        o = sdpa_with_mask(qg, kg, vg, keep, lg_g, scale)
                    out[g.b0:g.b1, :, g.q0:g.q1].copy_(o)

        cpu_pool.run([partial(forward_part, part) for part in parts], in_lanes)
        ctx.save_for_backward(q, k, v, lg, out)
        ctx.plan = (pieces, parts, tile, scale, backward_rows, lses if fused else None)
        return out

    @staticmethod
    def backward(ctx, d_out: Tensor):
        q, k, v, lg, out = ctx.saved_tensors
        pieces, parts, tile, scale, step, lses = ctx.plan
        macs = sum(_pairs(g) for g in pieces) * q.shape[1] * (q.shape[3] + v.shape[3])
        in_lanes = cpu_pool.lanes(macs, q.device)
        if lses is not None:
            dq, dk, dv = _fused_backward(q, k, v, lg, out, d_out, pieces, parts, tile, scale, lses, in_lanes)
            return dq, dk, dv, None, None, None, None, None
        want_dlg = lg is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dlg = _recomputed_backward(q, k, v, lg, out, d_out, pieces, parts, tile, scale, step, want_dlg,
                                                 in_lanes)
        return dq, dk, dv, dlg, None, None, None, None


def _forward_run(run: Run, q: Tensor, k: Tensor, v: Tensor, lg: Tensor | None, tile: TileFn, scale: float,
                 out: Tensor, lses: list[Tensor | None]) -> bool:
    """A run's pieces as one fused forward call over strided views (:mod:`learnmask.ops.block_runs`):
    writes their rows of ``out`` and each piece's log-sum-exp (a view of the run's), which the
    backward takes piece by piece. False (nothing done) when the run cannot be one call: batch rows
    that do not merge with heads in q, k, v or out, or masks not known to be shared by the batch rows
    and heads (``tile.shared``) or a gate over several batch rows (they would need a copy per head)."""
    g = run.first
    rows, keys, b = g.q1 - g.q0, g.k1 - g.k0, g.b1 - g.b0
    if b > 1 and (lg is not None or not (g.full or getattr(tile, "shared", False))):
        return False
    views = (view(q, run, g.q0, run.q_step, rows), view(k, run, g.k0, run.k_step, keys),
             view(v, run, g.k0, run.k_step, keys), view(out, run, g.q0, run.q_step, rows))
    if any(x is None for x in views):
        return False
    members = [run.member(i) for i in range(run.n)]
    keep = None
    if not g.full:
        tiles = [tile(m.b0, m.b1, m.q0, m.q1, m.k0, m.k1) for m in members]
        if any(t is None for t in tiles):
            return False
        same = all(t.shape == tiles[0].shape and torch.equal(t, tiles[0]) for t in tiles[1:])
        keep = tiles[0] if same else torch.cat(tiles)  # (1 | n, 1 | Hq, R, L): a window's band has one mask
    lg_run = None if lg is None else torch.cat([lg[m.b0:m.b1, None, None, m.k0:m.k1] for m in members])
    o, lse = cpu_flash.forward(*views[:3], cpu_flash.float_mask(keep, lg_run, q.dtype), scale)
    views[3].copy_(o)
    for j, i in enumerate(run.indices):  # (n, b·Hkv, G·R) -> each piece's (b, Hkv, G·R)
        lses[i] = lse[j].view(b, k.shape[1], -1)
    return True


def _fused_backward(q, k, v, lg, out, d_out, pieces, parts, tile, scale, lses, in_lanes):
    """dq, dk, dv from the fused CPU flash backward of every piece (keys accumulated in float32)."""
    acc = torch.float32 if q.dtype != torch.float64 else torch.float64
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)

    def part_grads(part: list[int]):
        k0, k1 = _key_span(pieces, part)
        dk = torch.zeros(k.shape[0], k.shape[1], k1 - k0, k.shape[3], dtype=acc, device=k.device)
        dv = torch.zeros(v.shape[0], v.shape[1], k1 - k0, v.shape[3], dtype=acc, device=v.device)
        for i in part:
            g = pieces[i]
            bs, qs, ks, local = slice(g.b0, g.b1), slice(g.q0, g.q1), slice(g.k0, g.k1), slice(g.k0 - k0, g.k1 - k0)
            keep = None if g.full else tile(g.b0, g.b1, g.q0, g.q1, g.k0, g.k1)
            lg_g = None if lg is None else lg[bs, None, None, ks]
            grads = cpu_flash.backward(d_out[bs, :, qs], q[bs, :, qs], k[bs, :, ks], v[bs, :, ks], out[bs, :, qs],
                                       lses[i], cpu_flash.float_mask(keep, lg_g, q.dtype), scale)
            dq[bs, :, qs] = grads[0]
            dk[bs, :, local] += grads[1]
            dv[bs, :, local] += grads[2]
        return k0, dk, dv

    spans = cpu_pool.run([partial(part_grads, part) for part in parts], in_lanes)
    if not spans:
        return dq, torch.zeros_like(k), torch.zeros_like(v)
    dk = _combine([(k0, dk) for k0, dk, _ in spans], tuple(k.shape), 2)
    dv = _combine([(k0, dv) for k0, _, dv in spans], tuple(v.shape), 2)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _recomputed_backward(q, k, v, lg, out, d_out, pieces, parts, tile, scale, step, want_dlg,
                                                 in_lanes):
    """dq, dk, dv and d log z (None unless ``want_dlg``) with probabilities recomputed ``step`` rows
    at a time (:func:`_rows_backward`), accumulated in the compute dtype."""
    cdt = compute_dtype(q.dtype)
    n_groups = q.shape[1] // k.shape[1]
    dq = torch.zeros(q.shape, dtype=cdt, device=q.device)

    def part_grads(part: list[int]):
        k0, k1 = _key_span(pieces, part)
        dk = torch.zeros(k.shape[0], k.shape[1], k1 - k0, k.shape[3], dtype=cdt, device=k.device)
        dv = torch.zeros(v.shape[0], v.shape[1], k1 - k0, v.shape[3], dtype=cdt, device=v.device)
        dlg = torch.zeros(lg.shape[0], k1 - k0, dtype=cdt, device=lg.device) if want_dlg else None
        for i in part:
            g = pieces[i]
            bs, ks, local = slice(g.b0, g.b1), slice(g.k0, g.k1), slice(g.k0 - k0, g.k1 - k0)
            kb, vb = k[bs, :, ks].to(cdt), v[bs, :, ks].to(cdt)
            lg_g = None if lg is None else lg[bs, None, None, None, ks].to(cdt)
            for r0 in range(g.q0, g.q1, step):
                r1 = min(r0 + step, g.q1)
                keep = None if g.full else tile(g.b0, g.b1, r0, r1, g.k0, g.k1)
                grads = _rows_backward(q[bs, :, r0:r1], kb, vb, out[bs, :, r0:r1], d_out[bs, :, r0:r1], keep, lg_g,
                                       scale, n_groups, cdt)
                dq[bs, :, r0:r1] = grads[0]
                dk[bs, :, local] += grads[1]
                dv[bs, :, local] += grads[2]
                if dlg is not None:
                    dlg[bs, local] += grads[3]
        return k0, dk, dv, dlg

    spans = cpu_pool.run([partial(part_grads, part) for part in parts], in_lanes)
    if not spans:
        zero_lg = torch.zeros_like(lg) if want_dlg else None
        return dq.to(q.dtype), torch.zeros_like(k), torch.zeros_like(v), zero_lg
    dk = _combine([(s[0], s[1]) for s in spans], tuple(k.shape), 2)
    dv = _combine([(s[0], s[2]) for s in spans], tuple(v.shape), 2)
    dlg = _combine([(s[0], s[3]) for s in spans], tuple(lg.shape), 1) if want_dlg else None
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None if dlg is None else dlg.to(lg.dtype)


def _rows_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, d_out: Tensor, keep: Tensor | None,
                   lg: Tensor | None, scale: float, groups: int, cdt: torch.dtype):
    """Gradients of one rectangle: rows q (B, Hq, R, D) against keys k, v (B, Hkv, L, D | Dv).

    The probabilities are recomputed in place in one (B, Hkv, G·R, L) buffer (softmax with the row
    maximum; a row with no kept key has maximum -inf, taken as 0, and denominator 0, taken as 1, so
    its probabilities are 0). Returns dq (B, Hq, R, D), dk (B, Hkv, L, D), dv (B, Hkv, L, Dv) and
    d log z (B, L) (None without a gate).
    """
    rows = q.shape[2]
    qs = rearrange(q.to(cdt), "b (hk g) r d -> b hk (g r) d", g=groups) * scale
    dog = rearrange(d_out.to(cdt), "b (hk g) r d -> b hk (g r) d", g=groups)
    og = rearrange(out.to(cdt), "b (hk g) r d -> b hk (g r) d", g=groups)
    p = qs @ k.transpose(-1, -2)  # scores, (B, Hkv, G·R, L); becomes the probabilities in place
    p5 = p.view(p.shape[0], p.shape[1], groups, rows, p.shape[-1])
    if lg is not None:
        p5.add_(lg)  # (B, 1, 1, 1, L)
    if keep is not None:
        keep5 = keep[:, :, None] if keep.shape[1] == 1 else rearrange(keep, "b (hk g) r l -> b hk g r l", g=groups)
        p5.masked_fill_(~keep5, float("-inf"))
    row_max = p.amax(-1, keepdim=True)
    row_max.masked_fill_(~torch.isfinite(row_max), 0.0)
    p.sub_(row_max).exp_()
    denom = p.sum(-1, keepdim=True)
    p.div_(denom.masked_fill_(denom == 0, 1.0))
    delta = (dog * og).sum(-1, keepdim=True)
    dv = p.transpose(-1, -2) @ dog
    ds = (dog @ v.transpose(-1, -2)).sub_(delta).mul_(p)  # dS = P ⊙ (dP − rowsum(dO ⊙ O))
    dq = rearrange((ds @ k) * scale, "b hk (g r) d -> b (hk g) r d", g=groups, r=rows)
    dk = ds.transpose(-1, -2) @ qs  # qs carries the scale
    dlg = ds.sum(dim=(1, 2)) if lg is not None else None
    return dq, dk, dv, dlg

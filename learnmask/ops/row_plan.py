"""Plan of a block-gathered attention: groups of query rows, each with the one key range it needs.

Each query row keeps its keys inside one interval ``[lo, hi)`` (all of it when "exact"): for a
structured mask :func:`learnmask.masks.structure_blocks.row_intervals` gives them from the
structure; for any other mask :func:`keep_intervals` reads them off the mask evaluated a chunk of
rows at a time.

:func:`plan_groups` cuts the queries into chunks of ``chunk`` rows, takes each chunk's union of
intervals, and merges neighbouring chunks while the merged rectangle stays within ``1 + slack`` of
the keys the rows really need. Given segment starts (the first query of each packed document), the
chunks are cut from each segment's start and no merge of that kind crosses one, so a bidirectional
document is one unmasked group reading exactly its keys and a causal one a staircase of its own;
neighbouring small documents are then merged into one partly-masked call where a simple cost model
(pairs and a fixed cost per call) prefers it. A window comes out as a band of rectangles, causal
as a staircase, padding as one group. With per-batch tensors the plan is made per batch row or
shared by the batch, whichever the cost model prefers.

Legend: B batch (1 when nothing depends on it), Q query length, K key length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["KVGroup", "keep_intervals", "plan_groups"]

# Rough CPU costs for choosing a per-row or a shared plan: seconds per call, multiply-adds per second.
_CALL_S = 5e-4
_MACS_PER_S = 2.5e10
_SPLIT_GAIN = 0.8
# merging whole documents: a partly-masked rectangle costs this much more per pair than an unmasked one
# (its mask is built and converted per call, forward and backward, and read by the kernel; measured on 2
# cores: merges priced at 1.25 or 2 lost to no merge on the benchmark's documents at S = 256..1024, at 3
# they tie with it, and on layouts of many small documents (1..12 tokens) they are 2-8x faster than it)
_MASKED = 3.0
_BIG = 2**40  # "no key" sentinel of a row's first key


@dataclass(frozen=True)
class KVGroup:
    """Batch rows [b0, b1) and queries [q0, q1) attend only to keys [k0, k1); ``full``: every pair of
    the rectangle is kept; ``k0 == k1``: no key is kept (the rows' output is 0)."""

    b0: int
    b1: int
    q0: int
    q1: int
    k0: int
    k1: int
    full: bool


def _span(keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """First and one-past-last True of each row of (B, K), and whether all between are True."""
    kv_len = keep.shape[-1]
    idx = torch.arange(kv_len, device=keep.device)
    first = torch.where(keep, idx, kv_len).amin(-1)
    last = torch.where(keep, idx, -1).amax(-1) + 1
    any_kept = last > 0
    first, last = torch.where(any_kept, first, 0), torch.where(any_kept, last, 0)
    return first, last, keep.sum(-1) == last - first


def keep_intervals(tile_rows, batch: int, q_len: int, kv_len: int, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`row_intervals` of an arbitrary mask, evaluated ``chunk`` query rows at a time.

    Args:
        tile_rows: ``(q0, q1) -> bool (B | 1, H | 1, q1 - q0, K)`` keep-mask of those rows.
    """
    los, his, exacts = [], [], []
    for q0 in range(0, q_len, chunk):
        tile = tile_rows(q0, min(q0 + chunk, q_len))
        any_head, all_head = tile.any(1), tile.all(1)  # (B | 1, rows, K)
        lo, hi, _ = _span(any_head)
        inside = torch.arange(kv_len, device=tile.device).view(1, 1, -1)
        inside = (inside >= lo[..., None]) & (inside < hi[..., None])
        exacts.append((all_head | ~inside).all(-1))
        los.append(lo)
        his.append(hi)
    lo, hi, exact = torch.cat(los, -1), torch.cat(his, -1), torch.cat(exacts, -1)
    return lo.expand(batch, q_len), hi.expand(batch, q_len), exact.expand(batch, q_len)


def plan_groups(lo: Tensor, hi: Tensor, exact: Tensor, chunk: int = 32, slack: float = 0.15,
                work_per_pair: float = 1.0, starts: Tensor | None = None) -> list[KVGroup]:
    """Groups of (batch rows, query rows) with their key range, covering every query of every row.

    Args:
        lo, hi, exact: (B, Q) from :func:`row_intervals` / :func:`keep_intervals`.
        chunk: query rows per chunk (the granularity of the plan).
        slack: merge neighbouring chunks while the merged rectangle needs at most ``1 + slack`` times
            the keys its rows really attend to.
        work_per_pair: multiply-adds per (query, key) pair over all heads, for the cost model.
        starts: bool (B | 1, Q), True at the query rows that begin a segment (a packed document), or
            None (one segment). Chunks start at every segment start, and a group holds either part of
            one segment or whole neighbouring segments (merged when the cost model prefers one call).
    """
    batch, q_len = lo.shape
    kv_len = int(hi.max()) if hi.numel() else 0
    if starts is None:
        starts = torch.zeros(1, q_len, dtype=torch.bool, device=lo.device)
    starts = starts.expand(batch, q_len)
    # a plan shared by the batch rows cuts only where every row starts a segment (their layouts differ:
    # a cut of one row's would split the others' documents); per-row plans cut at each row's own
    plans = [_plan_rows(lo, hi, exact, starts.all(0), 0, batch, chunk, slack, work_per_pair)]
    if batch > 1 and not bool((lo == lo[:1]).all() and (hi == hi[:1]).all() and (starts == starts[:1]).all()):
        plans.append([g for b in range(batch) for g in _plan_rows(lo[b:b + 1], hi[b:b + 1], exact[b:b + 1], starts[b],
                                                                  b, b + 1, chunk, slack, work_per_pair)])
    best = min(plans, key=lambda plan: _cost(plan, work_per_pair))
    full = bool(exact.all() and (lo == 0).all() and (hi == kv_len).all())
    single = [KVGroup(0, batch, 0, q_len, 0, kv_len, full)] if kv_len > 0 else best
    # one dense call wins unless splitting saves enough: the fused dense kernel is faster per pair
    return best if _cost(best, work_per_pair) < _SPLIT_GAIN * _cost(single, work_per_pair) else single


def _cost(plan: list[KVGroup], work_per_pair: float, masked: float = 1.0) -> float:
    """Seconds of a plan's calls: their pairs (``masked`` times dearer in partly-masked groups) and a
    fixed cost per call."""
    pairs = sum(_pairs(g) * (1.0 if g.full else masked) for g in plan)
    return pairs * work_per_pair / _MACS_PER_S + _CALL_S * sum(g.k1 > g.k0 for g in plan)


def _pairs(g: KVGroup) -> int:
    return (g.b1 - g.b0) * (g.q1 - g.q0) * (g.k1 - g.k0)


def _chunks(u_lo: Tensor, u_hi: Tensor, ok: Tensor, need: Tensor, starts: Tensor, chunk: int):
    """Chunks of at most ``chunk`` consecutive rows, each inside one segment (a segment is cut into
    chunks from its start). Returns per chunk: first row, key union ``[c_lo, c_hi)``, whether every
    row keeps exactly that union (given ``ok``: the row keeps all of its own union), the keys its rows
    need, and whether it begins a segment — as Python lists."""
    q_len, device = u_lo.shape[0], u_lo.device
    pos = torch.arange(q_len, device=device)
    begins = starts | (pos == 0)
    seg_start = torch.where(begins, pos, 0).cummax(0).values
    first = begins | ((pos - seg_start) % chunk == 0)
    cid = first.long().cumsum(0) - 1
    n = int(cid[-1]) + 1

    def reduce(x: Tensor, op: str, init) -> Tensor:
        return torch.full((n,), init, dtype=x.dtype, device=device).scatter_reduce(0, cid, x, op)

    c_lo, c_hi = reduce(u_lo, "amin", _BIG), reduce(u_hi, "amax", -1)
    c_ok = reduce((ok & (u_lo == c_lo[cid]) & (u_hi == c_hi[cid])).long(), "amin", 1)
    c_need = reduce(need, "sum", 0)
    return (pos[first].tolist(), c_lo.tolist(), c_hi.tolist(), c_ok.bool().tolist(), c_need.tolist(),
            begins[first].tolist())


def _plan_rows(lo: Tensor, hi: Tensor, exact: Tensor, starts: Tensor, b0: int, b1: int, chunk: int, slack: float,
               work_per_pair: float) -> list[KVGroup]:
    """Plan for batch rows [b0, b1) sharing every key range (``lo``/``hi``/``exact`` are theirs,
    ``starts`` (Q,) their segment starts)."""
    q_len = lo.shape[1]
    if q_len == 0:
        return []
    empty = lo >= hi
    u_lo = torch.where(empty, _BIG, lo).amin(0)  # union over the batch rows, empty rows ignored
    u_hi = torch.where(empty, -1, hi).amax(0)
    ok = ((lo == u_lo) & (hi == u_hi) & exact).all(0)
    need = torch.where(empty, 0, hi - lo).sum(0)  # keys the rows really attend to, summed over the batch rows
    q0s, c_lo, c_hi, c_ok, c_need, c_begins = _chunks(u_lo, u_hi, ok, need, starts, chunk)
    q1s = q0s[1:] + [q_len]
    groups: list[KVGroup] = []
    needs: list[int] = []
    whole: list[bool] = []  # the group began a segment
    rows = b1 - b0
    for q0, q1, k0, k1, full, nd, begins in zip(q0s, q1s, c_lo, c_hi, c_ok, c_need, c_begins):
        if k1 <= k0:
            k0 = k1 = 0
            full = False
        if groups:
            g = groups[-1]
            same_range = (g.k0, g.k1) == (k0, k1) and (not begins or k1 == 0)
            if same_range:  # the same keys (a document's chunks, or the next rows without keys)
                groups[-1] = KVGroup(b0, b1, g.q0, q1, k0, k1, g.full and full)
                needs[-1] += nd
                continue
            if not begins and g.k1 > g.k0 and k1 > k0:  # a staircase (causal, window) inside a segment
                m0, m1 = min(g.k0, k0), max(g.k1, k1)
                if rows * (q1 - g.q0) * (m1 - m0) <= (1 + slack) * (needs[-1] + nd):
                    groups[-1] = KVGroup(b0, b1, g.q0, q1, m0, m1, False)
                    needs[-1] += nd
                    continue
        groups.append(KVGroup(b0, b1, q0, q1, k0, k1, bool(full)))
        needs.append(nd)
        whole.append(begins)
    return _merge_segments(groups, whole, starts, work_per_pair)


def _merge_segments(groups: list[KVGroup], begins: list[bool], starts: Tensor, work_per_pair: float) -> list[KVGroup]:
    """Neighbouring groups that each hold whole segments merged into one partly-masked call where the
    cost model prefers it (small packed documents); every other group as it is."""
    q_len = starts.shape[0]
    ends = [g.q1 == q_len or bool(starts[g.q1]) for g in groups]
    out: list[KVGroup] = []
    last_whole = False
    for g, b, e in zip(groups, begins, ends):
        whole = b and e and g.k1 > g.k0
        if out and whole and last_whole:
            p = out[-1]
            merged = KVGroup(g.b0, g.b1, p.q0, g.q1, min(p.k0, g.k0), max(p.k1, g.k1), False)
            if _cost([merged], work_per_pair, _MASKED) < _cost([p, g], work_per_pair, _MASKED):
                out[-1] = merged
                continue
        out.append(g)
        last_whole = whole
    return out

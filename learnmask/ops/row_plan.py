"""Plan of a block-gathered attention: groups of query rows, each with the one key range it needs.

Each query row keeps its keys inside one interval ``[lo, hi)`` (all of it when "exact"): for a
structured mask :func:`learnmask.masks.structure_blocks.row_intervals` gives them from the
structure; for any other mask :func:`keep_intervals` reads them off the mask evaluated a chunk of
rows at a time.

:func:`plan_groups` cuts the queries into chunks of ``chunk`` rows, takes each chunk's union of
intervals, and merges neighbouring chunks while the merged rectangle stays within ``1 + slack`` of
the keys the rows really need. Packed documents come out as one group per document, a window as a
band of rectangles, causal as a staircase, padding as one group. With per-batch tensors the plan is
made per batch row or shared by the batch, whichever a simple cost model prefers.

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
                work_per_pair: float = 1.0) -> list[KVGroup]:
    """Groups of (batch rows, query rows) with their key range, covering every query of every row.

    Args:
        lo, hi, exact: (B, Q) from :func:`row_intervals` / :func:`keep_intervals`.
        chunk: query rows per chunk (the granularity of the plan).
        slack: merge neighbouring chunks while the merged rectangle needs at most ``1 + slack`` times
            the keys its rows really attend to.
        work_per_pair: multiply-adds per (query, key) pair over all heads, for the cost model.
    """
    batch, q_len = lo.shape
    kv_len = int(hi.max()) if hi.numel() else 0
    plans = [_plan_rows(lo, hi, exact, 0, batch, chunk, slack)]
    if batch > 1 and not bool((lo == lo[:1]).all() and (hi == hi[:1]).all()):
        plans.append([g for b in range(batch)
                      for g in _plan_rows(lo[b:b + 1], hi[b:b + 1], exact[b:b + 1], b, b + 1, chunk, slack)])
    best = min(plans, key=lambda plan: _cost(plan, work_per_pair))
    full = bool(exact.all() and (lo == 0).all() and (hi == kv_len).all())
    single = [KVGroup(0, batch, 0, q_len, 0, kv_len, full)] if kv_len > 0 else best
    # one dense call wins unless splitting saves enough: the fused dense kernel is faster per pair
    return best if _cost(best, work_per_pair) < _SPLIT_GAIN * _cost(single, work_per_pair) else single


def _cost(plan: list[KVGroup], work_per_pair: float) -> float:
    pairs = sum((g.b1 - g.b0) * (g.q1 - g.q0) * (g.k1 - g.k0) for g in plan)
    return pairs * work_per_pair / _MACS_PER_S + _CALL_S * sum(g.k1 > g.k0 for g in plan)


def _plan_rows(lo: Tensor, hi: Tensor, exact: Tensor, b0: int, b1: int, chunk: int, slack: float) -> list[KVGroup]:
    """Plan for batch rows [b0, b1) sharing every key range (``lo``/``hi``/``exact`` are theirs)."""
    q_len = lo.shape[1]
    empty = lo >= hi
    big = 2**40  # "no key" sentinel (exact in float, as F.pad takes its fill value)
    u_lo = torch.where(empty, big, lo).amin(0)  # union over the batch rows, empty rows ignored
    u_hi = torch.where(empty, -1, hi).amax(0)
    same = (lo == u_lo) & (hi == u_hi) & exact
    n = -(-q_len // chunk)
    pad = n * chunk - q_len

    def chunked(x: Tensor, value) -> Tensor:
        return torch.nn.functional.pad(x, (0, pad), value=value).view(n, chunk)

    c_lo = chunked(u_lo, big).amin(-1)
    c_hi = chunked(u_hi, -1).amax(-1)
    row_lo, row_hi = c_lo.repeat_interleave(chunk)[:q_len], c_hi.repeat_interleave(chunk)[:q_len]
    c_full = chunked(same.all(0) & (u_lo == row_lo) & (u_hi == row_hi), True).all(-1)
    need = torch.where(empty, 0, hi - lo).sum(0)  # keys the rows really attend to, summed over the batch rows
    c_need = chunked(need, 0).sum(-1)
    groups: list[KVGroup] = []
    needs: list[int] = []
    rows = b1 - b0
    for j, (k0, k1, full, nd) in enumerate(zip(c_lo.tolist(), c_hi.tolist(), c_full.tolist(), c_need.tolist())):
        q0, q1 = j * chunk, min((j + 1) * chunk, q_len)
        if k1 <= k0:
            k0 = k1 = 0
            full = False
        if groups:
            g = groups[-1]
            same_range = (g.k0, g.k1) == (k0, k1)
            if not same_range and g.k1 > g.k0 and k1 > k0:
                m0, m1 = min(g.k0, k0), max(g.k1, k1)
                if rows * (q1 - g.q0) * (m1 - m0) <= (1 + slack) * (needs[-1] + nd):
                    groups[-1] = KVGroup(b0, b1, g.q0, q1, m0, m1, False)
                    needs[-1] += nd
                    continue
            elif same_range:
                groups[-1] = KVGroup(b0, b1, g.q0, q1, k0, k1, g.full and full)
                needs[-1] += nd
                continue
        groups.append(KVGroup(b0, b1, q0, q1, k0, k1, bool(full)))
        needs.append(nd)
    return groups

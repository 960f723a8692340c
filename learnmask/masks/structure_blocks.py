"""Per-row key intervals and per-tile block states of a :class:`~learnmask.masks.structure.MaskStructure`,
derived from its two semantic methods (``position_bounds`` and the key conditions) and nothing else.

* :func:`row_intervals`: for each query row, the tightest key interval ``[lo, hi)`` holding every
  kept key, and whether every key of it is kept ("exact"). What block-gathered kernels plan with.
* :func:`block_states`: for each (query block, key block) tile, whether it keeps some pair and
  whether it keeps every pair — both exact, for every conjunction the structure can express (a
  window and padding that each keep something in a tile, but no common pair, give an empty tile).
  What a FlexAttention ``BlockMask`` is built from.
* :func:`key_spans`: the key conditions alone (documents, padding) as spans per query and per key,
  the tables the Triton kernel reads (it evaluates the position conditions itself).
* :func:`document_starts`: the queries that begin a packed document, where a plan cuts its groups.

Key conditions are evaluated through a sorted index of the keys each (batch row, document) keeps,
so counting the kept keys of any row in any key range is two binary searches: the work is
O(B·(Q + K)·log K) for the intervals plus O(bq) per tile that is neither surely empty nor surely
full (the diagonal of a causal mask, the edges of a window, of documents, of padding; a binary search
more per row whose interval has holes) — never one value per (query, key) pair. Documents that are
not contiguous runs make nearly every tile such a tile: O(B·Q·nk·log K), still exact.

Legend: B batch (1 when the structure holds no per-batch tensor), Q query length, K key length,
bq / bk query / key block sizes, nq = ceil(Q / bq), nk = ceil(K / bk).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from learnmask.masks.structure import MaskStructure

__all__ = ["row_intervals", "block_states", "key_spans", "document_starts"]

_TILE_ROWS_PER_STEP = 1 << 21  # candidate tiles are refined in steps of at most this many (tile, row) pairs


class _Members:
    """Positions of the members of each (batch row, group) sorted in one int64 array, so that the
    members of a query's group inside any range are counted or found with binary searches.

    Args:
        member_groups: (B, L) group id of each member position (None: one group).
        query_groups: (B, M) group id of each query (None: one group).
        valid: (B, L) bool, which positions are members at all (None: all).
    """

    def __init__(self, member_groups: Tensor | None, query_groups: Tensor | None, valid: Tensor | None,
                 batch: int, n_members: int, n_queries: int, device: torch.device) -> None:
        self.stride = n_members + 1
        if member_groups is None:
            m_rank = torch.zeros(1, 1, dtype=torch.int64, device=device)
            q_rank = torch.zeros(1, 1, dtype=torch.int64, device=device)
            n_groups = 1
        else:
            m_rank, q_rank, n_groups = _ranks(member_groups, query_groups, batch * self.stride)
        rows = torch.arange(batch, device=device).view(-1, 1) * n_groups
        codes = ((rows + m_rank) * self.stride + torch.arange(n_members, device=device)).expand(batch, n_members)
        codes = codes.flatten() if valid is None else codes[valid]
        # codes are in (batch row, position) order: sorted already when each row's groups never decrease
        if member_groups is not None and not bool((m_rank[:, 1:] >= m_rank[:, :-1]).all()):
            codes = codes.sort().values
        self.codes = codes
        self.base = ((rows + q_rank) * self.stride).expand(batch, n_queries)  # (B, M)

    def _search(self, base: Tensor, at: Tensor) -> Tensor:
        return torch.searchsorted(self.codes, base + at)

    def count(self, base: Tensor, a: Tensor, c: Tensor) -> Tensor:
        """Members of each query's group in positions [a, c) (0 where c <= a)."""
        n = self._search(base, c.clamp(min=0)) - self._search(base, a.clamp(min=0))
        return torch.where(c > a, n, 0)

    def first_last(self, base: Tensor, a: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """First member at or after a and one past the last member before c (garbage where none)."""
        n = self.codes.numel()
        if n == 0:
            return a, a
        first = self.codes[self._search(base, a).clamp(max=n - 1)] - base
        last = self.codes[(self._search(base, c) - 1).clamp(min=0)] - base + 1
        return first, last


def _ranks(member_groups: Tensor, query_groups: Tensor, scale: int) -> tuple[Tensor, Tensor, int]:
    """Group ids of members and queries as ranks 0..n-1 (their offsets from the smallest id when that
    keeps the codes within int64, else their ranks among the distinct ids), and n."""
    lowest = torch.minimum(member_groups.min(), query_groups.min())
    width = int(torch.maximum(member_groups.max(), query_groups.max()) - lowest) + 1
    if width * scale < 2**62:
        return member_groups - lowest, query_groups - lowest, width
    unique, inverse = torch.unique(torch.cat([member_groups.flatten(), query_groups.flatten()]), return_inverse=True)
    n = member_groups.numel()
    return inverse[:n].view(member_groups.shape), inverse[n:].view(query_groups.shape), unique.numel()


def _full(t: Tensor | None, batch: int, device: torch.device) -> Tensor | None:
    return None if t is None else t.to(device).expand(batch, *t.shape[1:])


def _key_index(s: MaskStructure, batch: int, q_len: int, kv_len: int, device: torch.device) -> _Members:
    """Index of the keys the key conditions keep, grouped by document, for the queries' documents."""
    return _Members(_full(s.kv_document_ids, batch, device), _full(s.q_document_ids, batch, device),
                    _full(None if s.key_padding is None else s.key_padding.to(torch.bool), batch, device),
                    batch, kv_len, q_len, device)


def _tighten(index: _Members, base: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """[lo, hi) shrunk to its first and last member (0, 0 when it holds none), and whether every
    position between them is a member."""
    count = index.count(base, lo, hi)
    first, last = index.first_last(base, lo, hi)
    none = count == 0
    lo, hi = torch.where(none, 0, first), torch.where(none, 0, last)
    return lo, hi, count == hi - lo


def row_intervals(s: MaskStructure, q_len: int, kv_len: int,
                  device: torch.device | str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Key interval of every query row and whether it is kept entirely.

    Returns:
        lo, hi: int64 (B, Q) with ``0 <= lo <= hi <= K``, the first kept key and one past the last
        (``lo == hi``: nothing kept); exact: bool (B, Q), True when every key of ``[lo, hi)`` is kept.
    """
    device = torch.device(device) if device is not None else s.device
    return _intervals(s, q_len, kv_len, device)[:3]


def _intervals(s: MaskStructure, q_len: int, kv_len: int, device: torch.device):
    """:func:`row_intervals` and the key index it used (None without key conditions)."""
    batch = s.batch
    q = torch.arange(q_len, device=device).view(1, -1)
    lo = torch.zeros(batch, q_len, dtype=torch.int64, device=device)
    hi = torch.full((batch, q_len), kv_len, dtype=torch.int64, device=device)
    if s.has_position_condition:
        p_lo, p_hi = s.to(device).position_bounds()(torch.arange(batch, device=device).view(-1, 1), q)
        lo = lo if p_lo is None else p_lo.expand(batch, q_len).clamp(0, kv_len)
        hi = hi if p_hi is None else p_hi.expand(batch, q_len).clamp(0, kv_len)
        hi = torch.maximum(hi, lo)
    if not s.has_key_condition:
        return lo, hi, torch.ones(batch, q_len, dtype=torch.bool, device=device), None
    index = _key_index(s, batch, q_len, kv_len, device)
    return (*_tighten(index, index.base, lo, hi), index)


def key_spans(s: MaskStructure, q_len: int, kv_len: int, device: torch.device | str | None = None):
    """The key conditions alone (documents, padding), per query and per key; None when there are none.

    Returns:
        ``(rows, cols)``: rows = (lo, hi, exact) each (B, Q): the keys each query's key conditions
        keep lie in ``[lo, hi)``, all of them when exact; cols = (lo, hi, exact) each (B, K): the
        same for the queries of each key (a padding key: ``lo == hi == 0``).
    """
    if not s.has_key_condition:
        return None
    device = torch.device(device) if device is not None else s.device
    batch = s.batch
    keys = _key_index(s, batch, q_len, kv_len, device)
    rows = _tighten(keys, keys.base, torch.zeros_like(keys.base), torch.full_like(keys.base, kv_len))
    queries = _Members(_full(s.q_document_ids, batch, device), _full(s.kv_document_ids, batch, device), None,
                       batch, q_len, kv_len, device)
    c_lo, c_hi, c_exact = _tighten(queries, queries.base, torch.zeros_like(queries.base),
                                   torch.full_like(queries.base, q_len))
    if s.key_padding is not None:
        real = _full(s.key_padding.to(torch.bool), batch, device)
        c_lo, c_hi, c_exact = torch.where(real, c_lo, 0), torch.where(real, c_hi, 0), c_exact | ~real
    return rows, (c_lo, c_hi, c_exact)


def document_starts(s: MaskStructure, q_len: int, device: torch.device | str | None = None) -> Tensor | None:
    """The queries that begin a packed document: bool (B, Q), True where a query's document id differs
    from the previous query's. None when the structure has no documents, or when in some batch row a
    document is not one contiguous run of queries (ids in any order, e.g. ``[2, 2, 0, 1, 1]``, are
    runs; ``[0, 1, 0]`` is not): cutting a plan at every change of id would then cut documents apart.
    """
    if s.q_document_ids is None or q_len == 0:
        return None
    ids = s.q_document_ids.to(device if device is not None else s.device)
    change = ids[:, 1:] != ids[:, :-1]
    distinct = (ids.sort(-1).values.diff(dim=-1) != 0).sum(-1)
    if not bool((change.sum(-1) == distinct).all()):
        return None
    return torch.nn.functional.pad(change, (1, 0), value=False)


def _blocks(x: Tensor, block: int, fill) -> Tensor:
    """(B, L) -> (B, ceil(L / block), block), the tail block filled with ``fill``."""
    pad = -x.shape[1] % block
    return rearrange(torch.nn.functional.pad(x, (0, pad), value=fill), "b (n r) -> b n r", r=block)


def block_states(s: MaskStructure, q_len: int, kv_len: int, block_q: int, block_k: int,
                 device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Classify each (query block, key block) tile of ``s``, exactly.

    Returns:
        ``(any_keep, all_keep)``, each bool (B, nq, nk): ``any_keep`` is True iff the tile keeps some
        pair, ``all_keep`` iff it keeps every pair (tail tiles: every pair inside the sequences).
    """
    device = torch.device(device) if device is not None else s.device
    lo, hi, exact, index = _intervals(s, q_len, kv_len, device)
    batch, nq, nk = lo.shape[0], -(-q_len // block_q), -(-kv_len // block_k)
    if q_len == 0 or kv_len == 0:
        empty = torch.zeros(batch, nq, nk, dtype=torch.bool, device=device)
        return empty, empty.clone()
    nonempty = lo < hi
    hull_lo = _blocks(torch.where(nonempty, lo, kv_len), block_q, kv_len).amin(-1)[..., None]
    hull_hi = _blocks(torch.where(nonempty, hi, 0), block_q, 0).amax(-1)[..., None]
    inner_lo = _blocks(lo, block_q, 0).amax(-1)[..., None]
    inner_hi = _blocks(hi, block_q, kv_len).amin(-1)[..., None]
    all_exact = _blocks(exact, block_q, True).all(-1)[..., None]
    k_lo = torch.arange(nk, device=device) * block_k
    k_hi = (k_lo + block_k).clamp(max=kv_len)
    touched = (hull_lo < k_hi) & (hull_hi > k_lo)  # some row's interval meets the key block
    all_keep = (inner_lo <= k_lo) & (inner_hi >= k_hi) & all_exact  # every row keeps all of it
    any_keep = touched.clone()
    candidates = (touched & ~all_keep).nonzero()
    if len(candidates):
        step = max(1, _TILE_ROWS_PER_STEP // block_q)
        for start in range(0, len(candidates), step):
            b, i, j = candidates[start:start + step].unbind(-1)
            some, every = _refine(b, i, k_lo[j], k_hi[j], lo, hi, exact, index, block_q, q_len)
            any_keep[b, i, j] = some
            all_keep[b, i, j] = every
    return any_keep, all_keep


def _refine(b: Tensor, i: Tensor, k0: Tensor, k1: Tensor, lo: Tensor, hi: Tensor, exact: Tensor,
            index: _Members | None, block_q: int, q_len: int) -> tuple[Tensor, Tensor]:
    """(keeps some pair, keeps every pair) of n tiles (query block i of batch row b, keys [k0, k1)),
    counted row by row."""
    rows = i[:, None] * block_q + torch.arange(block_q, device=i.device)  # (n, bq)
    valid = rows < q_len
    rows = rows.clamp(max=q_len - 1)
    bb = b[:, None].expand_as(rows)
    a = torch.maximum(lo[bb, rows], k0[:, None])
    c = torch.minimum(hi[bb, rows], k1[:, None])
    count = (c - a).clamp(min=0)
    if index is not None:
        holes = ~exact[bb, rows] & (count > 0)  # rows whose interval is not all kept: count the kept keys
        if bool(holes.any()):
            count[holes] = index.count(index.base[bb[holes], rows[holes]], a[holes], c[holes])
    some = ((count > 0) & valid).any(-1)
    every = ((count == (k1 - k0)[:, None]) | ~valid).all(-1)
    return some, every

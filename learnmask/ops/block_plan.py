"""Which (query block, key block) tiles of a :class:`MaskStructure` keep anything, and which keep all.

Block-sparse attention skips tiles where no pair is kept and evaluates the mask only in tiles where
some but not all pairs are kept. :func:`block_states` classifies every tile from the structure's few
numbers and per-block summaries of its tensors (min/max document id, count of real keys), in
O(B · Q/bq · K/bk) work and memory — never one value per (query, key) pair.

Guarantees, for every batch row b and tile (i, j):
``any_keep[b, i, j]`` is True whenever the tile keeps some pair (it may also be True for an empty
tile: document tiles are classified by id ranges, exact for sorted ids); ``all_keep[b, i, j]`` is
True only if the tile keeps every pair (exact).

:func:`structure_tile` evaluates the structure densely on one rectangle of positions (what a
block-gathered kernel needs for a partial tile).

Legend: B batch (1 when the structure holds no per-batch tensor), Q query length, K key length,
bq / bk query / key block sizes, nq = ceil(Q / bq), nk = ceil(K / bk).
"""

from __future__ import annotations

import torch
from torch import Tensor

from learnmask.ops.structure import MaskStructure

__all__ = ["block_states", "structure_tile", "structure_batch"]


def structure_batch(s: MaskStructure) -> int:
    """Batch size of the structure's per-batch tensors (1 when it holds none or all have batch 1)."""
    sizes = [t.shape[0] for t in (s.prefix_lengths, s.q_document_ids, s.kv_document_ids, s.key_padding)
             if t is not None]
    return max(sizes, default=1)


def _block_reduce(x: Tensor, block: int, op: str) -> Tensor:
    """(B, L) -> (B, ceil(L / block)) min / max / sum over each block (the tail block is shorter)."""
    n = -(-x.shape[1] // block)
    pad = n * block - x.shape[1]
    if op == "sum":
        return torch.nn.functional.pad(x.to(torch.int64), (0, pad), value=0).view(x.shape[0], n, block).sum(-1)
    padded = torch.cat([x, x[:, -1:].expand(x.shape[0], pad)], dim=1).view(x.shape[0], n, block)  # edge repeat
    return padded.amin(-1) if op == "min" else padded.amax(-1)


def block_states(s: MaskStructure, q_len: int, kv_len: int, block_q: int, block_k: int,
                 device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Classify each (query block, key block) tile of ``s``.

    Returns:
        ``(any_keep, all_keep)``, each bool (B, nq, nk) with B = :func:`structure_batch` (``s``).
    """
    device = device if device is not None else _structure_device(s)
    nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
    q_lo = torch.arange(nq, device=device).view(1, nq, 1) * block_q
    q_hi = torch.clamp(q_lo + block_q, max=q_len) - 1
    k_lo = torch.arange(nk, device=device).view(1, 1, nk) * block_k
    k_hi = torch.clamp(k_lo + block_k, max=kv_len) - 1
    any_keep = torch.ones(1, nq, nk, dtype=torch.bool, device=device)
    all_keep = torch.ones(1, nq, nk, dtype=torch.bool, device=device)

    if s.causal:
        if s.prefix_lengths is None:
            any_keep = any_keep & (k_lo <= q_hi)
            all_keep = all_keep & (k_hi <= q_lo)
        else:
            p = s.prefix_lengths.to(device).view(-1, 1, 1)
            any_keep = any_keep & ((k_lo <= q_hi) | (k_lo < p))
            all_keep = all_keep & ((k_hi <= q_lo) | (k_hi < p))
    if s.window is not None:
        d_min, d_max = q_lo - k_hi, q_hi - k_lo  # q - k takes every integer value in [d_min, d_max]
        any_keep = any_keep & (d_max >= 0) & (d_min < s.window)
        all_keep = all_keep & (d_min >= 0) & (d_max < s.window)
    if s.chunk_size is not None:
        c = s.chunk_size
        cq0, cq1, ck0, ck1 = q_lo // c, q_hi // c, k_lo // c, k_hi // c
        any_keep = any_keep & (cq0 <= ck1) & (ck0 <= cq1)
        all_keep = all_keep & (cq0 == cq1) & (ck0 == ck1) & (cq0 == ck0)
    if s.q_document_ids is not None:
        qd, kd = s.q_document_ids.to(device), s.kv_document_ids.to(device)
        q_min, q_max = _block_reduce(qd, block_q, "min")[:, :, None], _block_reduce(qd, block_q, "max")[:, :, None]
        k_min, k_max = _block_reduce(kd, block_k, "min")[:, None, :], _block_reduce(kd, block_k, "max")[:, None, :]
        any_keep = any_keep & (q_min <= k_max) & (k_min <= q_max)
        all_keep = all_keep & (q_min == q_max) & (k_min == k_max) & (q_min == k_min)
    if s.key_padding is not None:
        real = _block_reduce(s.key_padding.to(device=device, dtype=torch.bool), block_k, "sum")[:, None, :]
        size = (k_hi - k_lo + 1)
        any_keep = any_keep & (real > 0)
        all_keep = all_keep & (real == size)
    batch = structure_batch(s)
    return any_keep.expand(batch, nq, nk), all_keep.expand(batch, nq, nk)


def structure_tile(s: MaskStructure, q0: int, q1: int, k0: int, k1: int,
                   device: torch.device | str | None = None) -> Tensor | None:
    """Keep-mask of ``s`` on queries [q0, q1) × keys [k0, k1): bool (B | 1, 1, q1-q0 | 1, k1-k0),
    or None when the structure has no condition (everything kept)."""
    device = device if device is not None else _structure_device(s)
    q = torch.arange(q0, q1, device=device).view(1, 1, -1, 1)
    k = torch.arange(k0, k1, device=device).view(1, 1, 1, -1)
    keep: Tensor | None = None

    def meet(cond: Tensor) -> None:
        nonlocal keep
        keep = cond if keep is None else keep & cond

    if s.causal:
        cond = k <= q
        if s.prefix_lengths is not None:
            cond = cond | (k < s.prefix_lengths.to(device).view(-1, 1, 1, 1))
        meet(cond)
    if s.window is not None:
        d = q - k
        meet((d >= 0) & (d < s.window))
    if s.chunk_size is not None:
        meet((q // s.chunk_size) == (k // s.chunk_size))
    if s.q_document_ids is not None:
        qd = s.q_document_ids.to(device)[:, q0:q1].view(-1, 1, q1 - q0, 1)
        kd = s.kv_document_ids.to(device)[:, k0:k1].view(-1, 1, 1, k1 - k0)
        meet(qd == kd)
    if s.key_padding is not None:
        meet(s.key_padding.to(device=device, dtype=torch.bool)[:, k0:k1].view(-1, 1, 1, k1 - k0))
    return keep


def _structure_device(s: MaskStructure) -> torch.device:
    for t in (s.prefix_lengths, s.q_document_ids, s.kv_document_ids, s.key_padding):
        if t is not None:
            return t.device
    return torch.device("cpu")

"""FlexAttention ``BlockMask`` from an :class:`~learnmask.masks.attention.AttentionMask`.

A structured mask (one with a :class:`~learnmask.masks.structure.MaskStructure`) is classified tile by
tile, exactly, with :func:`learnmask.masks.structure_blocks.block_states` and handed to
``BlockMask.from_kv_blocks``:
no (B, H, Q, K) tensor is ever built, so building is cheap enough to do per batch (padding and
document masks change with every batch). Other masks go through FlexAttention's
``create_block_mask``, which evaluates the predicate on every pair.

Tiles are "full" (every pair kept: the kernel skips the predicate), "partial" (the kernel calls the
mask's ``mask_mod``) or skipped; the classification is exact, so the block mask equals what
``create_block_mask`` computes from every pair.
"""

from __future__ import annotations

import torch

from learnmask.masks.structure_blocks import block_states

__all__ = ["build_block_mask"]


def build_block_mask(mask, batch: int, heads: int, q_len: int, kv_len: int, device: torch.device,
                     block_size: int = 128):
    """BlockMask of ``mask`` with batch ``batch`` and ``heads`` heads (1 means broadcast).

    Raises:
        RuntimeError: FlexAttention is not available in this torch build.
    """
    try:
        from torch.nn.attention.flex_attention import BlockMask, create_block_mask
    except ImportError as error:  # torch < 2.5
        raise RuntimeError(f"FlexAttention is not available in torch {torch.__version__}: {error}") from error
    structure = mask.structure()
    if structure is None or mask.per_head:
        return create_block_mask(mask.mask_mod, batch, heads, q_len, kv_len, device=device, BLOCK_SIZE=block_size)
    any_keep, all_keep = block_states(structure, q_len, kv_len, block_size, block_size, device=device)
    # FlexAttention's convention (create_block_mask pads the mask with False): a tile that crosses the
    # end of either sequence is never "full", so the kernel applies mask_mod there
    all_keep = all_keep.clone()
    if q_len % block_size:
        all_keep[:, -1, :] = False
    if kv_len % block_size:
        all_keep[:, :, -1] = False
    any_keep = any_keep.expand(batch, -1, -1)
    all_keep = all_keep.expand(batch, -1, -1)
    partial = any_keep & ~all_keep
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(all_keep)
    return BlockMask.from_kv_blocks(kv_num[:, None], kv_idx[:, None], full_num[:, None], full_idx[:, None],
                                    BLOCK_SIZE=block_size, mask_mod=mask.mask_mod, seq_lengths=(q_len, kv_len))


def _ordered(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, nq, nk) bool -> counts (B, nq) int32 and indices (B, nq, nk) int32, selected first in order."""
    nk = selected.shape[-1]
    counts = selected.sum(-1).to(torch.int32)
    keys = torch.where(selected, 0, 1) * nk + torch.arange(nk, device=selected.device)
    indices = keys.argsort(dim=-1).to(torch.int32)
    return counts, indices.contiguous()

"""Parameter accounting for a head-gated model."""
from __future__ import annotations

import torch
from torch import nn

from learnmask.inject.heads import AttentionBlock


def _projection_shape(block: AttentionBlock) -> tuple[int, int]:
    """(input width H*D, output width) of the output projection (Linear or GPT-2 Conv1D)."""
    weight = block.out_proj.weight
    if isinstance(block.out_proj, nn.Linear):
        return weight.shape[1], weight.shape[0]
    return weight.shape[0], weight.shape[1]  # GPT-2 Conv1D stores (in, out)


def parameters_per_head(block: AttentionBlock) -> int:
    """Scalar parameters that removing one head of ``block`` deletes.

    A head owns ``D`` rows (and biases) of each of the query, key and value projections and
    ``D`` input columns of the output projection: ``4 * hidden * D + 3 * D``, with
    ``D = (H * D) / H``. Assumes one key/value head per query head (no grouped K/V) and biased
    q/k/v projections, as in BERT.
    """
    width, hidden = _projection_shape(block)
    head_dim = width // block.num_heads
    return 4 * hidden * head_dim + 3 * head_dim


def count_parameters(model: nn.Module, exclude: nn.Module | None = None) -> int:
    """Scalar parameters of ``model``, leaving out those of ``exclude`` (say, its gate)."""
    skip = {id(p) for p in exclude.parameters()} if exclude is not None else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def remaining_parameters(model: nn.Module, blocks: list[AttentionBlock], head_mask: torch.Tensor, exclude=None) -> int:
    """Parameters left once the heads closed in ``head_mask`` are physically removed.

    Args:
        head_mask: ``(L, H)``, > 0 where a head is kept.
    """
    total = count_parameters(model, exclude)
    closed = (head_mask <= 0).sum(dim=1).tolist()
    return total - sum(n * parameters_per_head(block) for n, block in zip(closed, blocks))

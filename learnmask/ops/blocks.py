"""The ``blocks`` masked-attention backend: block-gathered SDPA that skips the keys a group of
queries never keeps, with a memory-lean backward. Runs on any device; the fast path for training on
CPU, where FlexAttention has no backward.

Plan (:mod:`learnmask.ops.row_plan`): each query row keeps an interval of keys, derived from the
:class:`~learnmask.masks.structure.MaskStructure` in O(B·(Q + K)·log K) — or from the mask
evaluated ``block_q`` rows at a time for user predicates and dense tensors. Rows are grouped so
that each group reads one contiguous key range with little waste: the plan is cut at document
starts, so a packed document is one unmasked group reading exactly its keys (a staircase of its own
when causal; small neighbours merged whole when one call is cheaper), a band for a sliding window,
a staircase for causal masks, one range of real keys for padding (per batch row when that is cheaper).

Forward: one fused attention call per group on the gathered keys, with a small keep-mask only where
the rectangle is partly masked. Backward: PyTorch's fused CPU flash backward per group, or (a gate
that needs a gradient, other devices) a recomputing backward that saves only q, k, v, the output and
the log gate, never a (B, H, Q, K) tensor (FlashAttention-style recomputation; Dao et al., 2022) —
both in :mod:`learnmask.ops.blocks_autograd`. On CPU a plan's calls run in two lanes of worker
threads (:mod:`learnmask.ops.cpu_pool`: robust to cores shared with other processes). A pure causal
mask goes to SDPA's own causal kernel, and a plan with a single group to plain SDPA (fused
backward). With ``dropout_p`` > 0 each group is one SDPA call with SDPA's dropout under plain
autograd, one after another (the draws come from torch's global generator in plan order).

Legend: B batch, Hq query heads, Hkv key/value heads (G = Hq // Hkv), Q query length, K key length,
D head dim, Dv value head dim, L = k1 - k0 keys of one group.
"""

from __future__ import annotations

import torch
from torch import Tensor

from learnmask.masks.structure import MaskStructure
from learnmask.masks.structure_blocks import document_starts, row_intervals
from learnmask.ops.base import AttentionInputs
from learnmask.ops.blocks_autograd import BlockAttention, TileFn, compute_dtype
from learnmask.ops.common import apply_head_gate, empty_attention, is_empty, log_gate
from learnmask.ops.row_plan import KVGroup, keep_intervals, plan_groups
from learnmask.ops.sdpa import is_pure_causal, sdpa_with_mask

__all__ = ["BlocksBackend", "plan"]


class BlocksBackend:
    """Block-gathered SDPA.

    Args:
        block_q: query rows per chunk of the plan (the granularity of key skipping).
        backward_rows: query rows recomputed at a time in the backward (bounds its memory).
    """

    name = "blocks"

    def __init__(self, block_q: int = 64, backward_rows: int = 128) -> None:
        for label, value in (("block_q", block_q), ("backward_rows", backward_rows)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be an int >= 1; got {value!r}")
        self.block_q, self.backward_rows = block_q, backward_rows

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        """Always empty: every valid input can be planned (user predicates are evaluated per chunk)."""
        return []

    def __call__(self, inputs: AttentionInputs) -> Tensor:
        """Output (B, Hq, Q, Dv) in q's dtype (zeros when Q == 0 or K == 0)."""
        q, k, v = inputs.q, inputs.k, inputs.v
        if is_empty(inputs):
            return empty_attention(inputs)
        if inputs.token_gate is None and is_pure_causal(inputs.structure) and q.shape[2] == k.shape[2]:
            # SDPA's own causal kernel skips the upper triangle with a fused backward: nothing to gather.
            out = sdpa_with_mask(q, k, v, None, None, inputs.scale, is_causal=True, dropout_p=inputs.dropout_p)
            return apply_head_gate(out, inputs.head_gate)
        groups, tile = plan(inputs, self.block_q)
        busy = [g for g in groups if g.k0 < g.k1]
        if inputs.token_gate is None and len(busy) == 1 and (busy[0].b0, busy[0].b1, busy[0].q0, busy[0].q1) == (
                0, q.shape[0], 0, q.shape[2]):
            # One key range for everything (e.g. equal padding): a single SDPA call on the gathered keys,
            # differentiated by SDPA's fused backward.
            g = busy[0]
            keep = None if g.full else tile(g.b0, g.b1, g.q0, g.q1, g.k0, g.k1)
            out = sdpa_with_mask(q, k[:, :, g.k0:g.k1], v[:, :, g.k0:g.k1], keep, None, inputs.scale,
                                 dropout_p=inputs.dropout_p)
            return apply_head_gate(out, inputs.head_gate)
        lg = None
        if inputs.token_gate is not None:
            lg = log_gate(inputs.token_gate, compute_dtype(q.dtype)).expand(q.shape[0], k.shape[2])
        if inputs.dropout_p > 0:
            out = _groups_with_dropout(q, k, v, lg, groups, tile, inputs.scale, inputs.dropout_p)
        else:
            out = BlockAttention.apply(q, k, v, lg, groups, tile, inputs.scale, self.backward_rows)
        return apply_head_gate(out, inputs.head_gate)


def plan(inputs: AttentionInputs, block_q: int) -> tuple[list[KVGroup], TileFn]:
    """The groups of :func:`learnmask.ops.row_plan.plan_groups` for these inputs, and the function
    giving the keep-mask of any rectangle of them."""
    q, k, v = inputs.q, inputs.k, inputs.v
    batch, q_len, kv_len, device = q.shape[0], q.shape[2], k.shape[2], q.device
    work = q.shape[1] * (q.shape[3] + v.shape[3])
    structure = inputs.structure if inputs.structure is not None else (MaskStructure() if inputs.mask is None else None)
    if structure is not None:
        def intervals():
            return row_intervals(structure, q_len, kv_len, device)

        def cuts():
            return document_starts(structure, q_len, device)

        def tile(b0, b1, q0, q1, k0, k1):
            keep = structure.tile(q0, q1, k0, k1, device)
            return keep if keep is None or keep.shape[0] == 1 else keep[b0:b1]
    else:
        rows = _tile_fn(inputs)

        def intervals():
            return keep_intervals(lambda q0, q1: rows(q0, q1, 0, kv_len), batch, q_len, kv_len, block_q)

        def cuts():
            return None

        def tile(b0, b1, q0, q1, k0, k1):
            keep = rows(q0, q1, k0, k1)
            return keep if keep.shape[0] == 1 else keep[b0:b1]

    # every mask tile has batch and head dims 1 (what a run of pieces over several batch rows needs)
    tile.shared = (structure.batch == 1) if structure is not None else (
        inputs.mask.shape[0] == 1 and inputs.mask.shape[1] == 1 if isinstance(inputs.mask, Tensor)
        else not (inputs.mask.per_batch or inputs.mask.per_head))

    def groups():
        lo_, hi_, exact_ = (t.expand(batch, q_len) for t in intervals())
        return plan_groups(lo_, hi_, exact_, chunk=block_q, work_per_pair=work, starts=cuts())

    if inputs.mask is None or isinstance(inputs.mask, Tensor):
        return groups(), tile
    key = ("blocks_plan", batch, q.shape[1], q_len, kv_len, str(device), block_q, work)
    return inputs.mask.cached(key, groups), tile


def _tile_fn(inputs: AttentionInputs):
    """(q0, q1, k0, k1) -> keep-mask (B | 1, Hq | 1, q1 - q0, k1 - k0) of a dense or predicate mask."""
    mask = inputs.mask
    if isinstance(mask, Tensor):
        return lambda q0, q1, k0, k1: mask[:, :, q0:q1, k0:k1]
    b_len = inputs.q.shape[0] if mask.per_batch else 1
    h_len = inputs.q.shape[1] if mask.per_head else 1
    device = inputs.q.device
    b = torch.arange(b_len, device=device).view(-1, 1, 1, 1)
    h = torch.arange(h_len, device=device).view(1, -1, 1, 1)

    def tile(q0: int, q1: int, k0: int, k1: int) -> Tensor:
        q = torch.arange(q0, q1, device=device).view(1, 1, -1, 1)
        k = torch.arange(k0, k1, device=device).view(1, 1, 1, -1)
        return mask.mask_mod(b, h, q, k).expand(b_len, h_len, q1 - q0, k1 - k0)

    return tile


def _groups_with_dropout(q: Tensor, k: Tensor, v: Tensor, lg: Tensor | None, groups: list[KVGroup], tile: TileFn,
                         scale: float, dropout_p: float) -> Tensor:
    """Output (B, Hq, Q, Dv): one SDPA call with SDPA's dropout per group, differentiated by autograd
    (PyTorch's fused CPU kernels take no dropout, and a recomputing backward would have to replay the
    draws). Rows of groups with no key stay 0."""
    out = q.new_zeros(q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    for g in groups:
        if g.k0 == g.k1:
            continue
        keep = None if g.full else tile(g.b0, g.b1, g.q0, g.q1, g.k0, g.k1)
        lg_g = None if lg is None else lg[g.b0:g.b1, None, None, g.k0:g.k1]
        out[g.b0:g.b1, :, g.q0:g.q1] = sdpa_with_mask(
            q[g.b0:g.b1, :, g.q0:g.q1], k[g.b0:g.b1, :, g.k0:g.k1], v[g.b0:g.b1, :, g.k0:g.k1], keep, lg_g, scale,
            dropout_p=dropout_p)
    return out

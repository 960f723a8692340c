"""The ``blocks`` masked-attention backend: block-gathered SDPA that skips the keys a group of
queries never keeps, with a memory-lean backward. Runs on any device; the fast path for training on
CPU, where FlexAttention has no backward.

Plan (:mod:`learnmask.ops.row_plan`): each query row keeps an interval of keys, derived from the
:class:`~learnmask.masks.structure.MaskStructure` in O(B·(Q + K)·log K) — or from the mask evaluated ``block_q`` rows at a time for
user predicates and dense tensors. Rows are grouped so that each group reads one contiguous key
range with little waste: one group per packed document, a band for a sliding window, a staircase
for causal masks, one range of real keys for padding (per batch row when that is cheaper).

Forward: one fused ``scaled_dot_product_attention`` call per group on the gathered keys, with a small
keep-mask only where the rectangle is partly masked. Backward: a custom autograd function that
recomputes each group's probabilities ``backward_rows`` rows at a time (in float32 for fp16/bf16)
and accumulates dQ, dK, dV and d(log z); it saves only q, k, v, the output and the log gate, never a
(B, H, Q, K) tensor (FlashAttention-style recomputation; Dao et al., 2022). A pure causal mask goes
to SDPA's own causal kernel, and a plan with a single group to plain SDPA (fused backward). With
``dropout_p`` > 0 each group is one SDPA call with SDPA's dropout under plain autograd.

Legend: B batch, Hq query heads, Hkv key/value heads (G = Hq // Hkv), Q query length, K key length,
D head dim, Dv value head dim, L = k1 - k0 keys of one group.
"""

from __future__ import annotations

from typing import Callable

import torch
from einops import rearrange
from torch import Tensor

from learnmask.ops import cpu_flash
from learnmask.ops.base import AttentionInputs
from learnmask.masks.structure import MaskStructure
from learnmask.masks.structure_blocks import row_intervals
from learnmask.ops.row_plan import KVGroup, keep_intervals, plan_groups
from learnmask.ops.common import apply_head_gate, empty_attention, is_empty, log_gate
from learnmask.ops.sdpa import is_pure_causal, sdpa_with_mask

__all__ = ["BlocksBackend", "plan"]

# tile(b0, b1, q0, q1, k0, k1) -> bool keep-mask (b1-b0 | 1, Hq | 1, q1-q0 | 1, k1-k0), or None (all kept)
TileFn = Callable[[int, int, int, int, int, int], "Tensor | None"]


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
            lg = log_gate(inputs.token_gate, _compute_dtype(q.dtype)).expand(q.shape[0], k.shape[2])
        if inputs.dropout_p > 0:
            out = _groups_with_dropout(q, k, v, lg, groups, tile, inputs.scale, inputs.dropout_p)
        else:
            out = _BlockAttention.apply(q, k, v, lg, groups, tile, inputs.scale, self.backward_rows)
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

        def tile(b0, b1, q0, q1, k0, k1):
            keep = structure.tile(q0, q1, k0, k1, device)
            return keep if keep is None or keep.shape[0] == 1 else keep[b0:b1]
    else:
        rows = _tile_fn(inputs)

        def intervals():
            return keep_intervals(lambda q0, q1: rows(q0, q1, 0, kv_len), batch, q_len, kv_len, block_q)

        def tile(b0, b1, q0, q1, k0, k1):
            keep = rows(q0, q1, k0, k1)
            return keep if keep.shape[0] == 1 else keep[b0:b1]

    def groups():
        lo_, hi_, exact_ = (t.expand(batch, q_len) for t in intervals())
        return plan_groups(lo_, hi_, exact_, chunk=block_q, work_per_pair=work)

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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _BlockAttention(torch.autograd.Function):
    """Forward: one attention call per group. Backward: PyTorch's fused CPU flash backward per group
    when available and no gate needs a gradient; else probabilities recomputed per sub-block of rows."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, lg: Tensor | None, groups: list[KVGroup], tile: TileFn,
                scale: float, backward_rows: int) -> Tensor:
        fused = cpu_flash.available(q) and not (lg is not None and ctx.needs_input_grad[3])
        out = q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])
        lses = []
        for g in groups:
            rows = out[g.b0:g.b1, :, g.q0:g.q1]
            if g.k0 == g.k1:
                rows.zero_()  # no key kept
                lses.append(None)
                continue
            keep = None if g.full else tile(g.b0, g.b1, g.q0, g.q1, g.k0, g.k1)
            lg_g = None if lg is None else lg[g.b0:g.b1, None, None, g.k0:g.k1]
            qg, kg, vg = q[g.b0:g.b1, :, g.q0:g.q1], k[g.b0:g.b1, :, g.k0:g.k1], v[g.b0:g.b1, :, g.k0:g.k1]
            if fused:
                o, lse = cpu_flash.forward(qg, kg, vg, cpu_flash.float_mask(keep, lg_g, q.dtype), scale)
                lses.append(lse)
            else:
                o = sdpa_with_mask(qg, kg, vg, keep, lg_g, scale)
            rows.copy_(o)
        ctx.save_for_backward(q, k, v, lg, out)
        ctx.plan = (groups, tile, scale, backward_rows, lses if fused else None)
        return out

    @staticmethod
    def backward(ctx, d_out: Tensor):
        q, k, v, lg, out = ctx.saved_tensors
        groups, tile, scale, step, lses = ctx.plan
        if lses is not None:
            dq, dk, dv = _fused_backward(q, k, v, lg, out, d_out, groups, tile, scale, lses)
            return dq, dk, dv, None, None, None, None, None
        cdt = _compute_dtype(q.dtype)
        n_groups = q.shape[1] // k.shape[1]
        dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
        dk = torch.zeros(k.shape, dtype=cdt, device=k.device)
        dv = torch.zeros(v.shape, dtype=cdt, device=v.device)
        dlg = torch.zeros(lg.shape, dtype=cdt, device=lg.device) if lg is not None and ctx.needs_input_grad[3] else None
        for g in groups:
            if g.k0 == g.k1:
                continue
            bs, ks = slice(g.b0, g.b1), slice(g.k0, g.k1)
            kb, vb = k[bs, :, ks].to(cdt), v[bs, :, ks].to(cdt)
            lg_g = None if lg is None else lg[bs, None, None, None, ks].to(cdt)
            for r0 in range(g.q0, g.q1, step):
                r1 = min(r0 + step, g.q1)
                keep = None if g.full else tile(g.b0, g.b1, r0, r1, g.k0, g.k1)
                grads = _rows_backward(q[bs, :, r0:r1], kb, vb, out[bs, :, r0:r1], d_out[bs, :, r0:r1], keep, lg_g,
                                       scale, n_groups, cdt)
                dq[bs, :, r0:r1] = grads[0]
                dk[bs, :, ks] += grads[1]
                dv[bs, :, ks] += grads[2]
                if dlg is not None:
                    dlg[bs, ks] += grads[3]
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None if dlg is None else dlg.to(lg.dtype),
                None, None, None, None)


def _fused_backward(q, k, v, lg, out, d_out, groups, tile, scale, lses):
    """dq, dk, dv from the fused CPU flash backward of every group (accumulated in float32)."""
    acc = torch.float32 if q.dtype != torch.float64 else torch.float64
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    for g, lse in zip(groups, lses):
        if lse is None:
            continue
        bs, qs, ks = slice(g.b0, g.b1), slice(g.q0, g.q1), slice(g.k0, g.k1)
        keep = None if g.full else tile(g.b0, g.b1, g.q0, g.q1, g.k0, g.k1)
        lg_g = None if lg is None else lg[bs, None, None, ks]
        grads = cpu_flash.backward(d_out[bs, :, qs], q[bs, :, qs], k[bs, :, ks], v[bs, :, ks], out[bs, :, qs], lse,
                                   cpu_flash.float_mask(keep, lg_g, q.dtype), scale)
        dq[bs, :, qs] = grads[0]
        dk[bs, :, ks] += grads[1]
        dv[bs, :, ks] += grads[2]
    return dq, dk.to(k.dtype), dv.to(v.dtype)


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

"""Runs of the blocks backend (learnmask.ops.block_runs): pieces of equal shape at fixed steps computed
as one fused forward call over strided views — which pieces form runs, and three-way accuracy where
runs are taken and where they fall back to piece by piece (tensors whose batch rows do not merge
with heads, per-batch masks, token gates, GQA, bf16); the backward goes piece by piece from the
run's log-sum-exp."""

import pytest
import torch
from test_ops_attention import check_three_way, run

from learnmask.masks import attention as am
from learnmask.ops import block_runs, blocks_autograd, cpu_pool, row_plan
from learnmask.ops.attention import masked_attention
from learnmask.ops.blocks import BlocksBackend
from learnmask.ops.reference import ReferenceBackend
from learnmask.ops.row_plan import KVGroup


def test_runs_take_equal_shapes_at_fixed_steps():
    band = [KVGroup(0, 2, 0, 8, 0, 8, False), KVGroup(0, 2, 8, 16, 0, 16, False)]
    band += [KVGroup(0, 2, q0, q0 + 8, q0 - 12, q0 + 8, False) for q0 in range(16, 64, 8)]
    band += [KVGroup(0, 2, 64, 70, 52, 70, False)]  # the tail: fewer rows
    got = block_runs.runs(band, list(range(len(band))))
    assert [r.indices for r in got] == [(0,), (1,), tuple(range(2, 8)), (8,)]
    assert (got[2].q_step, got[2].k_step) == (8, 8) and got[2].member(5) == band[7]
    docs = [KVGroup(b, b + 1, q0, q0 + 5, q0, q0 + 5, True) for b in (0, 1) for q0 in (0, 5, 10)]
    assert [r.indices for r in block_runs.runs(docs, list(range(6)))] == [(0, 1, 2), (3, 4, 5)]
    cut = [KVGroup(0, 1, q0, q0 + 32, 100, 300, True) for q0 in (0, 32, 64)]  # one group cut by rows
    (whole,) = block_runs.runs(cut, [0, 1, 2])
    assert (whole.q_step, whole.k_step, whole.n) == (32, 0, 3)
    steps = [KVGroup(0, 1, 0, 4, 0, 4, True), KVGroup(0, 1, 4, 8, 4, 8, True), KVGroup(0, 1, 9, 13, 9, 13, True)]
    assert [r.indices for r in block_runs.runs(steps, [0, 1, 2])] == [(0, 1), (2,)]  # the step changed
    stairs = [KVGroup(0, 1, q0 + r, q0 + r + 4, q0, q0 + r + 4, False) for q0 in (0, 8, 16) for r in (0, 4)]
    assert [r.indices for r in block_runs.runs(stairs, list(range(6)))] == [(0, 2, 4), (1, 3, 5)]


def test_view_refuses_batch_rows_that_do_not_merge_with_heads():
    x = torch.randn(2, 16, 3, 4).transpose(1, 2)  # (B, H, S, D) from a (B, S, H, D) layout
    r = block_runs.Run((0, 1), KVGroup(0, 2, 0, 4, 0, 4, True), 4, 4)
    assert block_runs.view(x, r, 0, 4, 4) is None
    assert block_runs.view(x[:1], block_runs.Run((0, 1), KVGroup(0, 1, 0, 4, 0, 4, True), 4, 4), 0, 4, 4) is not None


@pytest.fixture
def calls(monkeypatch):
    """Sizes of the runs computed as one call; plans split wherever it saves pairs; lanes at every size."""
    monkeypatch.setattr(row_plan, "_CALL_S", 0.0)
    monkeypatch.setattr(row_plan, "_SPLIT_GAIN", 1.0)
    monkeypatch.setattr(cpu_pool, "MIN_PARALLEL_MACS", 0)
    whole = []
    real = blocks_autograd._forward_run

    def spy(r, *args):
        done = real(r, *args)
        if done:
            whole.append(r.n)
        return done

    monkeypatch.setattr(blocks_autograd, "_forward_run", spy)
    return whole


def _docs(b, s):
    return am.document(torch.arange(s).div(8, rounding_mode="floor").expand(b, s))


# (mask, inputs in a (B, S, H, D) layout, some run computed as one call)
CASES = {
    "window": (lambda b, s: am.sliding_window(6), False, True),
    "equal_documents": (_docs, False, True),
    # a plan shared by the rows with masks per row: no run of two rows can take them
    "equal_documents&causal": (lambda b, s: _docs(b, s) & am.causal(), False, False),
    "equal_documents&causal&padding": (
        lambda b, s: _docs(b, s) & am.causal() & am.padding(torch.arange(s)[None] < torch.tensor([[s], [s - 5]])),
        False, True),
    "window_transposed_layout": (lambda b, s: am.sliding_window(6), True, False),
}


@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_three_way_with_runs(calls, case, dtype, gqa):
    make, transposed, whole = CASES[case]
    b, hq, hkv, s, d = 2, 4, 2 if gqa else 4, 48, 8
    gen = torch.Generator().manual_seed(len(case))
    q = torch.randn(b, s, hq, d, generator=gen, dtype=torch.float64).transpose(1, 2)
    k, v = (torch.randn(b, s, hkv, d, generator=gen, dtype=torch.float64).transpose(1, 2) for _ in range(2))
    if not transposed:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    w = torch.randn(b, s, hq, d, generator=gen, dtype=torch.float64).transpose(1, 2)  # d_out in the other layout
    mask = make(b, s)
    golden_out, golden_grads = run(ReferenceBackend(), (q, k, v), {}, mask, torch.float64, w)
    ref_out, ref_grads = run(ReferenceBackend("input"), (q, k, v), {}, mask, dtype, w)
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    if transposed:  # keep the (B, S, H, D) layout of the inputs: batch rows do not merge with heads
        leaves = [t.detach().transpose(1, 2).to(dtype).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v)]
    out = masked_attention(*leaves, mask=mask, backend=BlocksBackend(block_q=4))
    grads = torch.autograd.grad((out.double() * w).sum(), leaves)
    assert whole == bool(calls), "runs computed as one call exactly where the views and masks allow"
    check_three_way(golden_out, ref_out, out.double(), dtype, "out", "blocks runs")
    for name, g0, g1, g2 in zip("qkv", golden_grads, ref_grads, grads):
        check_three_way(g0, g1, g2.double(), dtype, f"d{name}", "blocks runs")


def test_runs_give_the_same_numbers_in_lanes_and_inline(calls, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 8, generator=gen).requires_grad_() for _ in range(3))
    z = torch.rand(1, 64, generator=gen)

    def step():
        out = masked_attention(q[:1], k[:1], v[:1], mask=am.sliding_window(9), token_gate=z,
                               backend=BlocksBackend(block_q=4))
        return out, torch.autograd.grad((out * out).sum(), (q, k, v))

    out_1, grads_1 = step()
    assert calls  # a gate over one batch row: runs with the gate in their mask
    monkeypatch.setattr(cpu_pool, "MIN_PARALLEL_MACS", float("inf"))
    out_0, grads_0 = step()
    assert out_0.equal(out_1) and all(a.equal(b) for a, b in zip(grads_0, grads_1))

"""The blocks backend's thread policy (learnmask.ops.cpu_pool): a plan's calls run in two lanes.
Three-way accuracy in the lanes (every mask kind, gates with and without gradients, GQA, empty
rows), the same numbers as inline and repeatable, the reasons to stay inline, the split, and the
thread state the lanes must follow and not leak."""

import threading
import zlib

import pytest
import torch
from test_ops_attention import KINDS, SHAPES, check_three_way, make_inputs, make_mask, run

from learnmask.masks import attention as am
from learnmask.ops import blocks_autograd, cpu_pool, row_plan
from learnmask.ops.attention import masked_attention
from learnmask.ops.blocks import BlocksBackend
from learnmask.ops.reference import ReferenceBackend

BLOCKS = BlocksBackend(block_q=4)  # many small groups: many calls for the two lanes


@pytest.fixture
def pooled(monkeypatch):
    """Every plan with two calls or more runs in the lanes; yields (jobs, in lanes) of each run."""
    threads = torch.get_num_threads()
    if threads < 2:
        torch.set_num_threads(2)
    monkeypatch.setattr(cpu_pool, "MIN_PARALLEL_MACS", 0)
    monkeypatch.setattr(row_plan, "_CALL_S", 0.0)  # plans split wherever it saves pairs, even at these sizes
    monkeypatch.setattr(row_plan, "_SPLIT_GAIN", 1.0)
    calls: list[tuple[int, bool]] = []
    real = cpu_pool.run

    def spy(jobs, in_lanes=True):
        calls.append((len(jobs), in_lanes))
        return real(jobs, in_lanes)

    monkeypatch.setattr(blocks_autograd.cpu_pool, "run", spy)
    yield calls
    torch.set_num_threads(threads)


def inline(monkeypatch):
    monkeypatch.setattr(cpu_pool, "MIN_PARALLEL_MACS", float("inf"))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", [k for k in KINDS if k != "none"])
def test_lanes_three_way_forward_and_backward(pooled, kind, dtype, shape):
    gen = torch.Generator().manual_seed(zlib.crc32(repr(("pool", kind, dtype, shape)).encode()))
    gated = kind != "dense" and shape != SHAPES[-1]  # gates: the recomputing backward; else the fused one
    tensors, gates, w = make_inputs(shape, dtype, gated, gen)
    mask = make_mask(kind, shape[0], shape[3], shape[4], gen)
    golden_out, golden_grads = run(ReferenceBackend(), tensors, gates, mask, torch.float64, w)
    ref_out, ref_grads = run(ReferenceBackend("input"), tensors, gates, mask, dtype, w)
    out, grads = run(BLOCKS, tensors, gates, mask, dtype, w)
    if kind not in ("dense", "bias") and (gated or kind != "padding"):  # else one call: inline
        assert pooled and all(pooled), "the plan never reached the lanes"
    check_three_way(golden_out, ref_out, out, dtype, "out", "blocks in lanes")
    for name, g0, g1, g2 in zip(["q", "k", "v"] + list(gates), golden_grads, ref_grads, grads):
        check_three_way(g0, g1, g2, dtype, f"d{name}", "blocks in lanes")


def window_inputs(gate_grad: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 96, 16, generator=gen).requires_grad_()
    k, v = (torch.randn(2, 2, 96, 16, generator=gen).requires_grad_() for _ in range(2))  # GQA
    z = torch.rand(2, 96, generator=gen)
    z[:, ::7] = 0.0
    z[1, :40] = 0.0  # the first rows of batch row 1 keep no key
    return q, k, v, z.requires_grad_(gate_grad)


@pytest.mark.parametrize("gate_grad", [False, True], ids=["fused_backward", "recomputing_backward"])
def test_lanes_give_the_inline_numbers_bit_for_bit(pooled, monkeypatch, gate_grad):
    q, k, v, z = window_inputs(gate_grad)
    mask = am.sliding_window(20)
    params = [q, k, v] + ([z] if gate_grad else [])

    def step():
        out = masked_attention(q, k, v, mask=mask, token_gate=z, backend=BLOCKS)
        return out, torch.autograd.grad((out * out).sum(), params)

    out_1, grads_1 = step()
    out_2, grads_2 = step()
    assert pooled and all(in_lanes and jobs == 2 for jobs, in_lanes in pooled)
    assert out_1.equal(out_2) and all(a.equal(b) for a, b in zip(grads_1, grads_2))
    assert out_1[1, :, :40].eq(0).all()
    inline(monkeypatch)
    out_0, grads_0 = step()
    assert not pooled[-1][1]
    assert out_0.equal(out_1) and all(a.equal(b) for a, b in zip(grads_0, grads_1))


def test_lanes_follow_the_callers_inference_and_grad_modes(pooled):
    q, k, v, z = window_inputs(False)
    with torch.inference_mode():
        out = masked_attention(q, k, v, mask=am.sliding_window(20), token_gate=z, backend=BLOCKS)
    assert out.is_inference() and pooled
    with torch.no_grad():
        assert masked_attention(q, k, v, mask=am.sliding_window(20), backend=BLOCKS).grad_fn is None


def test_inline_reasons(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(cpu_pool, "MIN_PARALLEL_MACS", 100)
    assert "too little work" in cpu_pool.inline_reason(10, cpu)
    assert "meta" in cpu_pool.inline_reason(1e9, torch.device("meta"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cpu_pool.inline_reason(1e9, cpu) is None and cpu_pool.lanes(1e9, cpu)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
            assert "profiler" in cpu_pool.inline_reason(1e9, cpu)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert "autocast" in cpu_pool.inline_reason(1e9, cpu)
        assert cpu_pool.run([lambda: cpu_pool.inline_reason(1e9, cpu)] * 2) == ["called from a lane"] * 2
        torch.set_num_threads(1)
        assert "one intra-op thread" in cpu_pool.inline_reason(1e9, cpu) and not cpu_pool.lanes(1e9, cpu)
    finally:
        torch.set_num_threads(threads)


def test_lanes_use_the_callers_thread_count_and_leave_the_default_alone():
    threads = torch.get_num_threads()
    try:
        for n in (2, 3):
            torch.set_num_threads(n)
            assert cpu_pool.run([torch.get_num_threads] * 2) == [n, n]
            assert torch.get_num_threads() == n
            seen = []
            fresh = threading.Thread(target=lambda seen=seen: seen.append(torch.get_num_threads()))
            fresh.start()
            fresh.join()
            assert seen == [n]
    finally:
        torch.set_num_threads(threads)


def test_a_failing_job_raises_in_the_caller_after_every_job_ended():
    ended = []

    def fail():
        raise ValueError("boom")

    def slow():
        ended.append(True)
        return 1

    with pytest.raises(ValueError, match="boom"):
        cpu_pool.run([fail, slow])
    assert ended == [True]


@pytest.mark.parametrize("costs, parts", [([1] * 32, 2), ([5, 1, 1, 1, 1, 1], 2), ([3, 1, 4, 1, 5, 9, 2, 6], 3),
                                          ([1], 4), ([], 2), ([2, 2], 8)])
def test_split_is_consecutive_non_empty_and_balanced(costs, parts):
    with pytest.raises(ValueError, match="lanes"):
        cpu_pool.run([int] * (cpu_pool.LANES + 1))
    out = cpu_pool.split(costs, parts)
    assert [i for part in out for i in part] == list(range(len(costs)))
    assert all(part for part in out) and len(out) <= max(1, parts)
    if costs:
        share = sum(costs) / len(out)
        assert max(sum(costs[i] for i in part) for part in out) <= share + max(costs)

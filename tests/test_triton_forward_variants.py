"""Forward-kernel variants of the ``triton`` backend that the CUDA tuner and launcher choose among.

* every forward tile configuration shape: one run with the mask in every block (``SPLIT`` False)
  or partial / full / partial runs, BLOCK_M != BLOCK_N, sequence lengths that are not multiples of
  either block, every mask kind, GQA; output and the saved log2-sum-exp2 against float64 math;
* the token gate passed to the forward and dQ kernels as log2 z (large problems), forward and backward;
* the launch plan's flags: log2 gate from ``GATE_LOG2_MIN_SCORES`` scores up, document-id comparison
  only when some batch's key intervals are not exact.

Runs in Triton's CPU interpreter without CUDA (set up by ``test_triton_backend``, imported first).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_triton_backend import CASES, DEVICE, FLOOR, FUDGE, _inputs, _three_way, eager_attention

from learnmask.masks.structure import MaskStructure
from learnmask.ops import triton_launch

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# (BLOCK_M, BLOCK_N, num_warps, num_stages, SPLIT); S = 37, 45, 19, 29 are multiples of none
VARIANTS = [(16, 16, 4, 2, False), (32, 16, 4, 2, True), (16, 32, 4, 2, False), (32, 32, 4, 2, True)]
KINDS = ["none", "causal_gated", "causal_q_lt_k", "causal_q_gt_k", "window", "prefix", "chunk", "window_chunk",
         "documents", "documents_causal_q_ne_k", "documents_unsorted", "padding_holes", "padding_left_causal",
         "documents_padding_causal"]


def _golden_lse2(q, k, keep, z, scale):
    """(B, Hq, Q) log2 of sum_j kept z_j exp(scale q.k_j), in float64; -inf for rows keeping nothing."""
    group = q.shape[1] // k.shape[1]
    scores = torch.einsum("bhid,bhjd->bhij", q, k.repeat_interleave(group, dim=1)) * scale
    if z is not None:
        keep = keep & (z > 0)[:, None, None, :]
        scores = scores + torch.log(torch.where(z > 0, z, 1.0))[:, None, None, :]
    return torch.logsumexp(scores.masked_fill(~keep, float("-inf")), dim=-1) / math.log(2.0)


@pytest.mark.parametrize("config", VARIANTS, ids=str)
@pytest.mark.parametrize("case", KINDS)
def test_forward_configurations_match_golden_output_and_lse2(case, config):
    q_len, kv_len, build, gated, _ = CASES[case]
    (q, k, v, z, _), _ = _inputs(q_len, kv_len, gated, False, seed=11)
    q, k, v = (t.to(DEVICE) for t in (q, k, v))
    z = None if z is None else z.to(DEVICE)
    structure = build()
    keep = structure.keep(q_len, kv_len, batch=2, device=DEVICE)
    scale = 1.0 / math.sqrt(q.shape[-1])
    golden = eager_attention(q, k, v, keep, z)
    lowp = eager_attention(q.float(), k.float(), v.float(), keep, None if z is None else z.float())
    q32, k32, v32 = q.float(), k.float(), v.float()
    z32 = None if z is None else z.float().contiguous()
    plan = triton_launch.LaunchPlan.build(structure, q32, k32, v32, scale, (16, 16), gated)
    out, lse2 = triton_launch.forward(q32, k32, v32, triton_launch.gate_for_kernels(z32, plan), plan, config=config)
    err = (out.double() - golden).abs().max().item()
    bound = FUDGE * (lowp.double() - golden).abs().max().item() + FLOOR[torch.float32] * golden.abs().max().item()
    assert err <= bound, f"out: kernel error {err:.3g} > {bound:.3g}"
    expected = _golden_lse2(q, k, keep, z, scale)
    empty = torch.isinf(expected)
    assert torch.equal(torch.isposinf(lse2), empty)  # a row keeping nothing stores +inf
    assert (lse2[~empty].double() - expected[~empty]).abs().max().item() < 1e-4


@pytest.mark.parametrize("case", ["causal_gated", "window", "documents_padding_causal", "documents_unsorted"])
def test_gate_passed_as_log2_matches_golden_forward_and_backward(case, monkeypatch):
    """The path large problems take: log2 z once in torch, read by the forward and dQ kernels; a key
    with z = 0 (log2 z = -inf) is removed and a row whose keys are all gated off gives zeros."""
    monkeypatch.setattr(triton_launch, "GATE_LOG2_MIN_SCORES", 0)
    q_len, kv_len, build, _, _ = CASES[case]
    (q, k, v, z, g), grad = _inputs(q_len, kv_len, True, False, seed=12)
    z = z.clone()
    z[:, 0] = 0.0  # the causal row 0 keeps nothing
    structure = build()
    kernel, _ = _three_way(structure, (q, k, v, z, g), grad, torch.float32, q_len, kv_len)
    plan = triton_launch.LaunchPlan.build(structure, *(t.to(DEVICE, torch.float32) for t in (q, k, v)),
                                          1.0 / math.sqrt(q.shape[-1]), (16, 16), True)
    assert plan.fwd_meta["GATE_LOG2"]  # the path under test was taken
    if structure.causal:
        assert torch.equal(kernel[0][:, :, 0], torch.zeros_like(kernel[0][:, :, 0]))


def test_plan_flags_gate_log2_from_the_threshold_and_document_check_only_when_inexact():
    q = torch.zeros(1, 1, 2048, 16, device=DEVICE)
    big = triton_launch.LaunchPlan.build(MaskStructure(causal=True), q, q, q, 0.25, None, True)
    small = triton_launch.LaunchPlan.build(MaskStructure(causal=True), q[:, :, :1024], q[:, :, :1024],
                                           q[:, :, :1024], 0.25, None, True)
    ungated = triton_launch.LaunchPlan.build(MaskStructure(causal=True), q, q, q, 0.25, None, False)
    assert 2048 * 2048 >= triton_launch.GATE_LOG2_MIN_SCORES > 1024 * 1024
    assert big.fwd_meta["GATE_LOG2"] and not small.fwd_meta["GATE_LOG2"] and not ungated.fwd_meta["GATE_LOG2"]
    z = torch.rand(1, 2048, device=DEVICE)
    assert torch.equal(triton_launch.gate_for_kernels(z, big), torch.log2(z))
    assert triton_launch.gate_for_kernels(z, small) is z
    q = torch.zeros(2, 2, 37, 16, device=DEVICE)
    flags = {name: triton_launch.LaunchPlan.build(CASES[name][2](), q, q, q, 0.25, (16, 16), True).fwd_meta
             for name in ("causal", "documents", "padding_right", "documents_unsorted", "padding_holes")}
    assert not flags["causal"]["HAS_TABLE"] and not flags["causal"]["DOC_CHECK"]
    assert flags["documents"]["HAS_TABLE"] and not flags["documents"]["DOC_CHECK"]  # sorted: intervals exact
    assert not flags["padding_right"]["DOC_CHECK"]  # one run of real keys: exact
    assert flags["documents_unsorted"]["DOC_CHECK"] and flags["padding_holes"]["DOC_CHECK"]


@pytest.mark.skipif(DEVICE != "cuda", reason="tuned tile configurations at realistic shapes need a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_every_forward_configuration_and_the_tuned_log2_gate_path(dtype):
    """At B * H * Q * K above the log2-gate threshold: each candidate of FWD_CONFIGS (the tuner may pick
    any) gives the golden output, and the tuned op (forward and backward) passes the three-way test."""
    q_len = 1000  # not a multiple of 64 or 128
    docs = torch.stack([torch.repeat_interleave(torch.arange(3), torch.tensor([300, 500, 200])),
                        torch.zeros(q_len, dtype=torch.long)])
    structure = MaskStructure(causal=True, q_document_ids=docs, kv_document_ids=docs)
    (q, k, v, z, g), grad = _inputs(q_len, q_len, True, True, batch=2, heads=4, kv_heads=2, dim=64, dim_v=64, seed=13)
    keep = structure.keep(q_len, q_len, batch=2, device=DEVICE)
    qd, kd, vd, zd = (t.to(DEVICE) for t in (q, k, v, z))
    golden = eager_attention(qd, kd, vd, keep, zd)
    lowp = eager_attention(qd.to(dtype), kd.to(dtype), vd.to(dtype), keep, zd.float())
    ql, kl, vl = (t.to(dtype) for t in (qd, kd, vd))
    plan = triton_launch.LaunchPlan.build(structure, ql, kl, vl, 1.0 / 8.0, None, True)
    assert plan.fwd_meta["GATE_LOG2"] and not plan.fwd_meta["DOC_CHECK"]
    bound = FUDGE * (lowp.double() - golden).abs().max().item() + FLOOR[dtype] * golden.abs().max().item()
    for config in triton_launch.FWD_CONFIGS:
        out, _ = triton_launch.forward(ql, kl, vl, triton_launch.gate_for_kernels(zd.float(), plan), plan,
                                       config=config)
        err = (out.double() - golden).abs().max().item()
        assert err <= bound, f"{config}: kernel error {err:.3g} > {bound:.3g}"
    _three_way(structure, (q, k, v, z, g), grad, dtype, q_len, q_len, block_sizes=None)

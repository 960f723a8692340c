"""Accounting: expected remaining parameters (differentiable) against Monte Carlo of exact counts,
analytic FLOPs, per-layer reports of gated vs finalized models, and the TensorBoard summary."""
import dataclasses
import math

import pytest
import torch
import zoo
from test_finalize import EXACT_COUNT, gated
from test_inject_masks import granularities

from learnmask.export import finalize
from learnmask.gates import FixedGate
from learnmask.inject import apply_masks
from learnmask.stats import layer_report, total_flops
from learnmask.summary import log_summary, summary


@pytest.mark.parametrize("name", ["bert", "llama", "gpt2"])
def test_expected_parameters_match_monte_carlo(name):
    """E[count] under independent hard-concrete samples equals the analytic expectation: the
    product rule for blocks x units x hidden and 1 - Π(1 - p) for key/value groups."""
    model, handle = gated(name, seed=3, closed=False)
    with torch.no_grad():
        for gate in handle.gates.values():
            gate.log_alpha.mul_(0.3)  # mostly fractional probabilities: a sharp test
    expected = handle.expected_remaining_parameters().item()
    torch.manual_seed(0)
    counts = []
    for _ in range(3000):
        counts.append(handle.parameters_for({name: gate.sample() for name, gate in handle.gates.items()}))
    counts = torch.tensor(counts, dtype=torch.float64)
    standard_error = counts.std().item() / math.sqrt(len(counts))
    assert abs(counts.mean().item() - expected) < 4 * standard_error
    assert standard_error > 0  # the samples did vary


def test_expected_parameters_are_differentiable_and_exact_at_the_corners():
    model, handle = gated("llama", closed=False)
    remaining = handle.expected_remaining_parameters()
    remaining.backward()
    for name, gate in handle.gates.items():
        assert gate.log_alpha.grad is not None and gate.log_alpha.grad.abs().sum() > 0, name
        assert torch.all(gate.log_alpha.grad >= 0)  # opening a gate never lowers the count
    sparsity = handle.expected_parameter_sparsity()
    assert 0 < sparsity.item() < 1 and sparsity.requires_grad
    # all open: nothing removed; all closed heads+ffn: exactly their parameters removed
    dense = handle.dense_parameters()
    assert handle.parameters_for({}) == dense
    bert = zoo.make("bert")
    h = apply_masks(bert, heads=True, ffn=True, gate="fixed")
    assert h.expected_parameter_sparsity().item() == 0
    assert h.expected_remaining_parameters().item() == h.dense_parameters()
    closed = {"heads": torch.zeros(2, 4), "ffn": torch.zeros(2, 64)}
    per_layer_removed = 4 * (4 * 32 * 8 + 3 * 8) + 64 * (2 * 32 + 1)  # BERT heads and FFN units
    assert h.parameters_for(closed) == h.dense_parameters() - 2 * per_layer_removed


def test_prunable_and_sparsity_definition():
    model = zoo.make("bert")
    handle = apply_masks(model, heads=True, gates={"heads": FixedGate(torch.tensor([[1.0, 0, 0, 1], [1, 1, 1, 1]]))})
    per_head = 4 * 32 * 8 + 3 * 8
    layer = 4 * per_head + 32 + (32 * 64 + 64 + 64 * 32 + 32) + 4 * 32  # heads, out bias, FFN, 2 LayerNorms
    assert handle.prunable_parameters() == 2 * layer
    assert handle.expected_parameter_sparsity().item() == pytest.approx(2 * per_head / (2 * layer))
    assert handle.remaining_parameters() == handle.dense_parameters() - 2 * per_head


def test_flops_values_by_hand():
    model = zoo.make("bert")
    s, d, heads, head_dim, units = 16, 32, 4, 8, 64
    attention = 2 * s * d * heads * head_dim * 4 + 4 * s * s * heads * head_dim  # q,k,v,o + QKᵀ, AV
    ffn = 2 * s * d * units * 2
    reports = layer_report(model, seq_len=s)
    assert [(r.flops_attention, r.flops_ffn) for r in reports] == [(attention, ffn)] * 2
    assert total_flops(model, seq_len=s, batch_size=3) == 3 * 2 * (attention + ffn)
    handle = apply_masks(model, heads=True, ffn=True, gates={
        "heads": FixedGate(torch.tensor([[1.0, 0, 0, 1], [1, 1, 1, 1]])),
        "ffn": FixedGate(torch.cat([torch.ones(2, 16), torch.zeros(2, 48)], dim=1))})
    gated_reports = layer_report(handle, seq_len=s)
    assert gated_reports[0].flops_attention == attention / 2 and gated_reports[0].flops_ffn == ffn / 4
    assert gated_reports[0].heads == 2 and gated_reports[0].units == 16 and gated_reports[0].heads_total == 4
    with pytest.raises(ValueError, match="seq_len must be an int >= 1; got 0"):
        layer_report(model, seq_len=0)


@pytest.mark.parametrize("name", EXACT_COUNT + ["llama"])
def test_gated_report_equals_finalized_report(name):
    model, handle = gated(name)
    before = layer_report(handle, seq_len=12)
    after = layer_report(finalize(handle), seq_len=12)
    strip = lambda r: dataclasses.replace(r, heads_total=0, units_total=0)  # noqa: E731
    if name == "llama":  # padding of uneven key/value groups may add heads, never remove them
        assert all(a.heads >= b.heads and a.kv_groups == b.kv_groups for a, b in zip(after, before))
    else:
        assert [strip(r) for r in before] == [strip(r) for r in after]


def test_tensorboard_summary_with_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    model, handle = gated("bert")
    writer = SummaryWriter(log_dir=str(tmp_path))
    values = log_summary(writer, handle, step=7, seq_len=16)
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    assert set(events.Tags()["histograms"]) == {f"log_alpha/{g}" for g in granularities("bert")}
    assert events.Scalars("parameters/remaining")[0].value == handle.remaining_parameters()
    assert events.Scalars("flops/total")[0].step == 7
    histogram = events.Histograms("log_alpha/heads")[0].histogram_value
    assert histogram.num == 8 and histogram.min == pytest.approx(handle.gates["heads"].log_alpha.min().item())
    assert values == summary(handle, seq_len=16)
    assert values["keep_ratio/heads/layer_0"] == 0.0 and 0 < values["keep_ratio/hidden"] < 1
    assert values["flops/total"] == total_flops(handle, seq_len=16)

"""Gating a finalized model whose attention or FFN block was emptied: the stub finalize left (its
output bias; BERT's post-norm ``LayerNorm(x + b)``) is part of the hidden stream like every
other block. Hidden dims (plus FFN units or heads, whichever still has equal sizes in every
layer) gated on the finalized model: all-open gates reproduce it; the gated model in eval equals
its own finalize; ``remaining_parameters()`` is the twice-finalized model's count; and
``save_pruned``/``load_pruned`` round-trip the twice-finalized model bit-identically."""
import dataclasses

import pytest
import torch
import zoo
from test_save_pruned import _same_structure

from learnmask.export import finalize, load_pruned, save_pruned
from learnmask.gates import FixedGate
from learnmask.inject import apply_masks
from learnmask.stats import count_parameters, layer_report

OPEN_TOLERANCE, FINALIZE_TOLERANCE = 1e-6, 1e-5  # fp32, max abs diff
HIDDEN = ["bert", "roberta", "distilbert", "gpt2", "vit", "llama"]  # the families hidden gating supports
BLOCKS = ["attention", "ffn"]


def _units(name: str) -> int:
    return 128 if name == "gpt2" else 64


def emptied(name: str, block: str) -> torch.nn.Module:
    """``zoo.make(name)`` finalized with layer 0's ``block`` emptied (every head or FFN unit
    closed, the block's output bias kept) and a few units of layer 1's removed."""
    if block == "attention":
        heads = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])  # llama: group (2, 3) goes whole
        handle = apply_masks(zoo.make(name), heads=True, gates={"heads": FixedGate(heads)})
    else:
        ffn = torch.ones(2, _units(name))
        ffn[0], ffn[1, ::5] = 0.0, 0.0
        handle = apply_masks(zoo.make(name), ffn=True, gates={"ffn": FixedGate(ffn)})
    return finalize(handle)


def _other(block: str) -> dict:
    """The unit granularity still gateable once layer 0's ``block`` is emptied (layers differ in
    the emptied one)."""
    return dict(heads=False, ffn=True) if block == "attention" else dict(heads=True)


def regated(name: str, plain: torch.nn.Module, block: str, seed: int = 0):
    """``plain`` gated on hidden dims and :func:`_other` units with random hard-concrete gates:
    some hidden dims closed, some fractional, the first three kept."""
    handle = apply_masks(plain, hidden=True, **_other(block))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in handle.gates.values():
            gate.log_alpha.copy_(torch.randn(gate.log_alpha.shape, generator=g) * 3)
        if "heads" in handle.gates and name == "llama":  # whole key/value groups: no padding to count
            groups = torch.randn(2, 2, generator=g) * 3
            handle.gates["heads"].log_alpha.copy_(groups.repeat_interleave(2, dim=1))
        handle.gates["hidden"].log_alpha[:3] = 10.0
        handle.gates["hidden"].log_alpha[3:6] = -10.0
    z = handle.eval_masks()["hidden"]
    assert (z == 0).any() and ((z > 0) & (z < 1)).any()
    return handle


def _reports(target) -> list:
    """``layer_report`` without the unit totals (a gated model's are the sizes it was gated at)."""
    return [dataclasses.replace(r, heads_total=0, units_total=0) for r in layer_report(target, seq_len=8)]


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("name", HIDDEN)
def test_open_hidden_gates_reproduce_the_finalized_model(name, block):
    plain, batch = emptied(name, block), zoo.inputs(name)
    expected = zoo.run(name, plain, batch)
    handle = apply_masks(plain, hidden=True, **_other(block), gate_options={"init_log_alpha": 5.0})
    assert all(bool((z == 1).all()) for z in handle.eval_masks().values())
    assert (zoo.run(name, plain, batch) - expected).abs().max().item() <= OPEN_TOLERANCE
    handle.remove()
    assert torch.equal(zoo.run(name, plain, batch), expected)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("name", HIDDEN)
def test_gated_finalized_model_equals_its_finalize_counts_and_round_trips(name, block, tmp_path):
    plain, batch = emptied(name, block), zoo.inputs(name)
    handle = regated(name, plain, block)
    expected = zoo.run(name, plain, batch)
    again = finalize(handle)
    assert (zoo.run(name, again, batch) - expected).abs().max().item() <= FINALIZE_TOLERANCE
    assert count_parameters(again) == handle.remaining_parameters() < count_parameters(plain)
    assert _reports(handle) == _reports(again)  # per layer too: a stub's bias is counted where it is
    save_pruned(again, tmp_path)
    loaded = load_pruned(tmp_path)
    assert torch.equal(zoo.run(name, loaded, batch), zoo.run(name, again, batch))
    _same_structure(loaded, again)


def test_bert_post_norm_stub_is_a_stream_norm():
    """BERT's emptied attention is ``LayerNorm(x + b)``: closing a hidden dim leaves it out of that
    norm's mean and variance too, like every other norm on the stream."""
    plain = emptied("bert", "attention")
    stub = plain.bert.encoder.layer[0].attention
    assert type(stub).__name__ == "RemovedAttention"
    handle = regated("bert", plain, "attention")
    assert stub.norm in handle.hidden_stream.norms
    kept = int((handle.eval_masks()["hidden"] > 0).sum())
    again = finalize(handle).bert.encoder.layer[0].attention
    assert again.bias.shape == (kept,) and again.norm.normalized_shape == (kept,)


@pytest.mark.parametrize("block", BLOCKS)
def test_encoder_layer_refuses_hidden_and_regates_heads_or_ffn(block, tmp_path):
    """``nn.TransformerEncoderLayer`` has no hidden gating (its attention fixes the width); its
    emptied blocks' biases still count and round-trip when the other units are gated."""
    name = "encoder_layer"
    plain, batch = emptied(name, block), zoo.inputs(name)
    with pytest.raises(ValueError, match="hidden-dimension gating is not supported for transformer_encoder_layer"):
        apply_masks(plain, hidden=True, heads=False)
    handle = apply_masks(plain, **_other(block))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in handle.gates.values():
            gate.log_alpha.copy_(torch.randn(gate.log_alpha.shape, generator=g) * 3)
    expected = zoo.run(name, plain, batch)
    again = finalize(handle)
    assert (zoo.run(name, again, batch) - expected).abs().max().item() <= FINALIZE_TOLERANCE
    assert count_parameters(again) == handle.remaining_parameters() < count_parameters(plain)
    assert _reports(handle) == _reports(again)
    save_pruned(again, tmp_path)
    loaded = load_pruned(tmp_path)
    assert torch.equal(zoo.run(name, loaded, batch), zoo.run(name, again, batch))
    _same_structure(loaded, again)

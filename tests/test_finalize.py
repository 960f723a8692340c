"""finalize(): the pruned plain model equals the gated model in eval, is smaller by exactly the
counted parameters, holds no learnmask object, and loads and runs where learnmask is absent."""
import copy
import pathlib
import subprocess
import sys

import pytest
import torch
import zoo
from test_inject_masks import granularities

from learnmask.export import finalize
from learnmask.gates import FixedGate
from learnmask.inject import apply_masks

TOLERANCE = 1e-5  # fp32, max abs diff
# finalize removes exactly what remaining_parameters() counts, except where it keeps zeros:
# grouped-query padding (llama)
EXACT_COUNT = ["bert", "roberta", "distilbert", "gpt2", "vit", "encoder_layer", "multihead_attention"]


def gated(name: str, seed: int = 0, closed: bool = True):
    """A tiny model of ``name`` with random hard-concrete gates (eval masks partly fractional),
    layer 0's attention heads all closed and layer 1's FFN block closed when ``closed``."""
    model = zoo.make(name)
    handle = apply_masks(model, **granularities(name))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in handle.gates.values():
            gate.log_alpha.copy_(torch.randn(gate.log_alpha.shape, generator=g) * 3)
        if closed:
            handle.gates["heads"].log_alpha[0] = -10.0
            if "ffn_blocks" in handle.gates:
                handle.gates["ffn_blocks"].log_alpha[1] = -10.0
            if "hidden" in handle.gates:
                handle.gates["hidden"].log_alpha[:3] = 10.0  # at least some dims kept
    masks = handle.eval_masks()
    assert any(((m > 0) & (m < 1)).any() for m in masks.values())  # fractional values get baked
    assert any((m == 0).any() for m in masks.values())
    return model, handle


@pytest.mark.parametrize("closed", [True, False])
@pytest.mark.parametrize("name", zoo.ARCHS)
def test_finalize_equals_gated_eval(name, closed):
    model, handle = gated(name, closed=closed)
    batch = zoo.inputs(name)
    expected = zoo.run(name, model, batch)
    plain = finalize(handle)
    assert (zoo.run(name, plain, batch) - expected).abs().max().item() <= TOLERANCE
    assert torch.equal(zoo.run(name, model, batch), expected)  # the gated model is untouched
    dense = sum(p.numel() for p in zoo.make(name).parameters())
    count = sum(p.numel() for p in plain.parameters())
    if name in EXACT_COUNT:
        assert count == handle.remaining_parameters() < dense
    else:
        assert name == "llama" and handle.remaining_parameters() <= count < dense


@pytest.mark.parametrize("name", zoo.ARCHS)
def test_finalized_model_is_plain(name):
    model, handle = gated(name)
    plain = finalize(handle)
    for module in plain.modules():
        assert not type(module).__module__.startswith("learnmask"), type(module)
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert not hasattr(plain, "learnmask_gates")
    assert not any("learnmask" in key for key in plain.state_dict())


def test_finalize_removes_units_physically():
    model, handle = gated("bert")
    masks = handle.eval_masks()
    plain = finalize(handle)
    layer0, layer1 = plain.bert.encoder.layer
    assert type(layer0.attention).__name__ != "BertAttention"  # every head closed: a stub
    kept_heads = int((masks["heads"][1] > 0).sum())
    kept_dims = int((masks["hidden"] > 0).sum())
    assert layer1.attention.self.query.weight.shape == (kept_heads * 8, kept_dims)
    assert layer1.attention.self.num_attention_heads == kept_heads
    kept_units = int((masks["ffn"][0] > 0).sum()) if masks["ffn_blocks"][0] > 0 else 0
    assert layer0.intermediate.dense.weight.shape == (kept_units, kept_dims)
    assert layer1.output.dense.weight.shape == (kept_dims, 0) and layer1.output.dense.bias is None
    assert plain.bert.embeddings.word_embeddings.weight.shape == (100, kept_dims)


def test_gqa_keeps_groups_and_pads_uneven_ones():
    model = zoo.make("llama")
    heads = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]])  # groups: (0, 1), (2, 3)
    handle = apply_masks(model, heads=True, gates={"heads": FixedGate(heads)})
    batch = zoo.inputs("llama")
    expected = zoo.run("llama", model, batch)
    plain = finalize(handle)
    att0, att1 = (layer.self_attn for layer in plain.model.layers)
    assert att0.q_proj.out_features == 8 and att0.k_proj.out_features == 8 and att0.num_key_value_groups == 1
    assert att1.q_proj.out_features == 32 and att1.k_proj.out_features == 16  # group 2 padded with head 2
    assert (zoo.run("llama", plain, batch) - expected).abs().max().item() <= TOLERANCE


def test_tied_embeddings_stay_tied_after_hidden_pruning():
    model, handle = gated("gpt2")
    plain = finalize(handle)
    assert plain.lm_head.weight is plain.transformer.wte.weight


def test_inplace_and_eval_k():
    model, handle = gated("distilbert", closed=False)
    handle.gates["heads"].eval_k = 3  # exactly 3 heads over all layers
    batch = zoo.inputs("distilbert")
    expected = zoo.run("distilbert", model, batch)
    plain = finalize(handle, inplace=True)
    assert plain is model and not hasattr(model, "learnmask_gates")
    heads = [layer.attention.n_heads if hasattr(layer.attention, "n_heads") else 0
             for layer in plain.distilbert.transformer.layer]
    assert sum(heads) == 3
    assert (zoo.run("distilbert", plain, batch) - expected).abs().max().item() <= TOLERANCE


def test_saves_and_loads_without_learnmask(tmp_path):
    saved = {}
    for name in zoo.ARCHS:
        model, handle = gated(name)
        plain = finalize(handle)
        batch = zoo.inputs(name)
        saved[name] = (plain, batch, zoo.run(name, model, batch))
    torch.save(saved, tmp_path / "finalized.pt")
    code = f"""
import sys
sys.modules["learnmask"] = None  # any import of learnmask now fails
sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})  # the tests' own MHAStack module
import torch
for name, (model, batch, expected) in torch.load({str(tmp_path / "finalized.pt")!r}, weights_only=False).items():
    with torch.no_grad():
        out = model(batch["x"]) if "x" in batch else model(**batch).logits
    print(name, (out - expected).abs().max().item())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    diffs = dict(line.split() for line in result.stdout.strip().splitlines())
    assert sorted(diffs) == sorted(zoo.ARCHS)
    assert all(float(v) <= TOLERANCE for v in diffs.values()), diffs


def test_deepcopy_and_state_dict_of_finalized_model():
    model, handle = gated("bert")
    plain = finalize(handle)
    batch = zoo.inputs("bert")
    clone = copy.deepcopy(plain)
    assert torch.equal(zoo.run("bert", clone, batch), zoo.run("bert", plain, batch))
    clone.load_state_dict(plain.state_dict())
    assert all(torch.equal(v, clone.state_dict()[k]) for k, v in plain.state_dict().items())


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_finalize_head_gates_of_the_recipe_and_the_model_itself(name):
    from learnmask.inject import apply_head_gates

    model, batch = zoo.make(name), zoo.inputs(name)
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    handle = apply_head_gates(model, FixedGate(mask))
    expected = zoo.run(name, model, batch)
    plain = finalize(model)  # the handle is found through the model's hooks
    assert (zoo.run(name, plain, batch) - expected).abs().max().item() <= TOLERANCE
    assert torch.equal(zoo.run(name, model, batch), expected) and handle.gates is model.learnmask_gates
    assert not hasattr(plain, "learnmask_gates") and not plain._forward_pre_hooks
    dense = sum(p.numel() for p in zoo.make(name).parameters())
    assert sum(p.numel() for p in plain.parameters()) < dense
    masks_handle = apply_masks(zoo.make(name), heads=True, gates={"heads": FixedGate(mask)})
    assert sum(p.numel() for p in finalize(masks_handle).parameters()) == sum(p.numel() for p in plain.parameters())


def test_finalize_of_an_ungated_model_is_an_error():
    with pytest.raises(ValueError, match="BertForSequenceClassification carries no learnmask gates"):
        finalize(zoo.make("bert"))


def test_finalize_records_what_it_kept_in_original_indices():
    model = zoo.make("llama")
    heads = torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]])  # groups (0, 1), (2, 3)
    plain = finalize(apply_masks(model, heads=True, gates={"heads": FixedGate(heads)}))
    record = plain.learnmask_pruning
    assert record["architecture"] == {"library": "transformers", "class": "LlamaForCausalLM",
                                      "attn_implementation": "sdpa"}
    assert [layer["attention"] for layer in record["layers"]] == [
        {"heads": 4, "kept": [1], "bias": True}, {"heads": 4, "kept": [0, 1, 2, 3], "bias": True}]  # 2 pads (2, 3)
    assert record["hidden"] == {"size": 32, "kept": None} and record["layers"][0]["ffn"]["kept"] == list(range(64))
    again = finalize(apply_masks(plain, heads=False, hidden=True,
                                 gates={"hidden": FixedGate((torch.arange(32) >= 4).float())}))
    assert again.learnmask_pruning["hidden"]["kept"] == list(range(4, 32))
    assert again.learnmask_pruning["layers"] == record["layers"]
    assert plain.learnmask_pruning["hidden"]["kept"] is None  # the first record is left as it was


def test_the_record_survives_deepcopy_of_a_rebuilt_multihead_attention():
    mha = torch.nn.MultiheadAttention(16, 4).eval()
    plain = finalize(apply_masks(mha, heads=True, gates={"heads": FixedGate(torch.tensor([[1.0, 0.0, 1.0, 0.0]]))}))
    assert type(plain).__name__ == "PrunedMultiheadAttention"
    assert copy.deepcopy(plain).learnmask_pruning["layers"][0]["attention"]["kept"] == [0, 2]


@pytest.mark.parametrize("target", [None, "model", 3, [torch.nn.Linear(2, 2)]])
def test_finalize_of_something_else_says_what_it_expects(target):
    with pytest.raises(TypeError, match=r"finalize expects the handle of apply_masks .* or the gated model "
                                        rf"\(an nn.Module\); got {type(target).__name__}"):
        finalize(target)

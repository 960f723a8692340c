"""apply_masks on tiny random models of every supported architecture: all-open gates are the
identity, remove() is bit-identical, deepcopy/state_dict round trips, clear errors."""
import copy

import pytest
import torch
import zoo
from torch import nn
from torch.nn.utils import parametrize

from learnmask.gates import FixedGate, HardConcreteGate, param_groups
from learnmask.inject import MaskConfig, apply_masks, find_layers

ALL = dict(heads=True, ffn=True, attention_blocks=True, ffn_blocks=True)


def granularities(name: str) -> dict:
    """Every granularity the architecture supports."""
    if name == "multihead_attention":
        return dict(heads=True, attention_blocks=True)
    if name == "encoder_layer":
        return dict(ALL)
    return dict(ALL, hidden=True)


def _randomise(handle, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in handle.gates.values():
            gate.log_alpha.copy_(torch.randn(gate.log_alpha.shape, generator=g) * scale)


@pytest.mark.parametrize("name", zoo.ARCHS)
@pytest.mark.parametrize("gate", ["fixed_open", "hard_concrete_open"])
def test_all_open_gates_reproduce_base_outputs(name, gate):
    model, batch = zoo.make(name), zoo.inputs(name)
    base = zoo.run(name, model, batch)
    options = dict(gate="fixed") if gate == "fixed_open" else dict(gate_options={"init_log_alpha": 5.0})
    handle = apply_masks(model, **granularities(name), **options)
    assert set(handle.gates) == {k for k, v in granularities(name).items() if v}
    assert all(torch.equal(z, torch.ones_like(z)) for z in handle.eval_masks().values())
    assert (zoo.run(name, model, batch) - base).abs().max().item() <= 1e-6
    # the gates do act: closing heads of layer 0 changes the output
    mask = torch.ones(handle.gates["heads"].shape)
    mask[0, :2] = 0
    handle.set_gate("heads", FixedGate(mask))
    assert (zoo.run(name, model, batch) - base).abs().max().item() > 1e-5


@pytest.mark.parametrize("name", zoo.ARCHS)
def test_remove_restores_the_model_bit_for_bit(name):
    model, batch = zoo.make(name), zoo.inputs(name)
    state = copy.deepcopy(model.state_dict())
    classes = [type(m) for m in model.modules()]
    base = zoo.run(name, model, batch)
    handle = apply_masks(model, **granularities(name))
    _randomise(handle)
    assert not torch.equal(zoo.run(name, model, batch), base)
    handle.remove()
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert [type(m) for m in model.modules()] == classes  # parametrized classes restored
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert torch.equal(zoo.run(name, model, batch), base)
    apply_masks(model, heads=True)  # and it can be gated again


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "encoder_layer", "multihead_attention"])
def test_deepcopy_of_a_gated_model_gates_itself(name):
    model, batch = zoo.make(name), zoo.inputs(name)
    handle = apply_masks(model, **granularities(name))
    _randomise(handle)
    clone = copy.deepcopy(model)
    expected = zoo.run(name, model, batch)
    assert torch.equal(zoo.run(name, clone, batch), expected)
    with torch.no_grad():  # the copy's gates are its own
        clone.learnmask_gates["heads"].log_alpha.fill_(-10.0)
    assert not torch.equal(zoo.run(name, clone, batch), expected)
    assert torch.equal(zoo.run(name, model, batch), expected)
    model.train(), clone.train()  # same seed, same training sample
    with torch.no_grad():
        clone.learnmask_gates["heads"].log_alpha.copy_(handle.gates["heads"].log_alpha)
    torch.manual_seed(3)
    a = zoo.run(name, model, batch)
    torch.manual_seed(3)
    assert torch.equal(zoo.run(name, clone, batch), a)
    model.eval(), clone.eval()
    expected = zoo.run(name, model, batch)
    clone.learnmask_gates["heads"].log_alpha.data.fill_(-10.0)
    copied = next(h for m in clone.modules() for h in m._forward_pre_hooks.values() if hasattr(h, "handle")).handle
    assert copied is not handle and copied.model is clone
    copied.remove()  # removing the copy's gates leaves the original gated
    assert torch.equal(zoo.run(name, model, batch), expected)
    assert torch.equal(zoo.run(name, clone, batch), zoo.run(name, zoo.make(name), batch))


@pytest.mark.parametrize("name", ["bert", "vit", "llama", "encoder_layer"])
def test_state_dict_round_trip_is_bit_identical(name):
    model, batch = zoo.make(name), zoo.inputs(name)
    _randomise(apply_masks(model, **granularities(name)))
    other = zoo.make(name, seed=5)
    apply_masks(other, **granularities(name))
    assert not torch.equal(zoo.run(name, other, batch), zoo.run(name, model, batch))
    other.load_state_dict(model.state_dict())
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in model.state_dict().items())
    assert torch.equal(zoo.run(name, other, batch), zoo.run(name, model, batch))


def test_gates_follow_mode_and_sample_once_per_forward():
    model, batch = zoo.make("bert"), zoo.inputs("bert")
    handle = apply_masks(model, heads=True, ffn=True, gate_options={"init_log_alpha": 0.0})
    assert not any(g.training for g in handle.gates.values())  # model in eval -> deterministic
    zoo.run("bert", model, batch)
    assert torch.equal(handle.z["heads"], torch.full((2, 4), 0.5))
    model.train()
    seen = []
    for layer in model.bert.encoder.layer:
        layer.output.dense.register_forward_pre_hook(lambda m, a: seen.append(handle.z["ffn"]))
    model(**batch)
    assert seen[0] is seen[1] and ((handle.z["ffn"] > 0) & (handle.z["ffn"] < 1)).any()


def test_closing_ffn_units_equals_zeroing_their_weights():
    model, batch = zoo.make("bert"), zoo.inputs("bert")
    reference = copy.deepcopy(model)
    mask = torch.ones(2, 64)
    mask[1, 5:30] = 0
    with torch.no_grad():
        reference.bert.encoder.layer[1].output.dense.weight[:, 5:30] = 0
    apply_masks(model, heads=False, ffn=True, gates={"ffn": FixedGate(mask)})
    torch.testing.assert_close(zoo.run("bert", model, batch), zoo.run("bert", reference, batch), atol=1e-6, rtol=0)


def test_param_groups_and_handle_parameters():
    model = zoo.make("bert")
    handle = apply_masks(model, **ALL)
    gate_ids = {id(p) for p in handle.gate_parameters()}
    assert len(gate_ids) == 4
    assert gate_ids.isdisjoint(id(p) for p in handle.base_parameters())
    groups = param_groups(model, lr=1e-3, weight_decay=0.1)
    assert {id(p) for p in groups[1]["params"]} == gate_ids and groups[1]["weight_decay"] == 0.0
    assert handle.dense_parameters() == sum(p.numel() for p in zoo.make("bert").parameters())


def test_target_modules_for_a_custom_model():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6), nn.Linear(6, 3))
    x = torch.randn(2, 8)
    heads = torch.tensor([[1.0, 0.0]])
    units = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0, 1.0]])
    with torch.no_grad():
        expected = model[3](model[2](model[1](model[0](x)) * torch.tensor([1.0] * 4 + [0.0] * 4)) * units[0])
    handle = apply_masks(model, target_modules=["2"], num_heads=2, ffn_modules=["3"], ffn=True,
                         gates={"heads": FixedGate(heads), "ffn": FixedGate(units)})
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    handle.remove()


@pytest.mark.parametrize("call, message", [
    (lambda m: apply_masks(nn.Sequential(nn.Linear(4, 4))),
     r"no attention blocks found in Sequential \(supported: .*\); pass target_modules=\[\.\.\.\]"),
    (lambda m: apply_masks(m, gate="hard_concret"), r"unknown gate 'hard_concret'; known gates: fixed, "),
    (lambda m: apply_masks(m, gates={"heads": FixedGate(torch.ones(3, 4))}),
     r"heads gate has shape \(3, 4\); expected \(2, 4\) for BertForSequenceClassification"),
    (lambda m: apply_masks(m, ffn=True, gates={"ffn": HardConcreteGate((2, 65))}),
     r"ffn gate has shape \(2, 65\); expected \(2, 64\)"),
    (lambda m: apply_masks(m, gate_options={"init_keep_ratio": 1.5}), r"init_keep_ratio must be in \(0, 1\]; got 1.5"),
    (lambda m: apply_masks(m, gate_options={"init_keep_ratio": 0.0}), r"init_keep_ratio must be in \(0, 1\]; got 0.0"),
    (lambda m: apply_masks(m, head=True), r"unknown mask config key\(s\) 'head'; known: heads, ffn"),
    (lambda m: apply_masks(m, heads=False), r"nothing to gate"),
    (lambda m: apply_masks(m, gates={"ffn": FixedGate(torch.ones(2, 64))}), r"gates given for \['ffn'\]"),
    (lambda m: apply_masks(m, target_modules=["nope"], num_heads=2), r"target module 'nope' not found"),
    (lambda m: apply_masks(m, target_modules=["classifier"]), r"target_modules given without num_heads"),
    (lambda m: apply_masks(zoo.make("encoder_layer"), hidden=True),
     r"hidden-dimension gating is not supported for transformer_encoder_layer"),
    (lambda m: apply_masks(zoo.make("multihead_attention"), ffn=True), r"ffn gating needs an FFN block in every layer"),
])
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call(zoo.make("bert"))


def test_double_apply_and_unknown_head_for_hidden():
    model = zoo.make("bert")
    apply_masks(model)
    with pytest.raises(ValueError, match="already has learnmask gates; call remove"):
        apply_masks(model)
    import transformers as T
    double = T.GPT2DoubleHeadsModel(T.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=4))
    with pytest.raises(ValueError, match="hidden-dimension gating does not know the task head of GPT2DoubleHeadsModel"):
        apply_masks(double, hidden=True)


def test_config_from_dict_and_layers_found():
    config = MaskConfig.from_dict({"heads": True, "ffn": True, "gate": "topk", "gate_options": {"k": 3}})
    assert config.granularities() == ("heads", "ffn")
    handle = apply_masks(zoo.make("llama"), config)
    assert int(handle.gates["heads"]().sum()) == 3
    assert [layer.arch for layer in find_layers(zoo.make("distilbert"))] == ["distilbert"] * 2
    att = find_layers(zoo.make("llama"))[0].attention
    assert (att.num_heads, att.num_kv_heads, att.head_dim) == (4, 2, 8)

"""Issue 14's parameter masks through the front door: ``lm.apply_masks(model, freeze=...,
weight_masks=..., diff_masks=...)`` and the one ``MaskHandle`` (``mask_updates``,
``attach_optimizer``, ``export_weights``, ``remove``), on tiny models, by value."""
import copy

import pytest
import torch
from conftest import tiny_bert
from torch import nn

import learnmask as lm
from learnmask import params
from learnmask.inject.handle import GATES_ATTRIBUTE

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = dict(freeze={"pattern": "0.*"}, weight_masks={"pattern": "2.weight"}, diff_masks={"pattern": "4.*"})


def mlp() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))


def bert():
    torch.manual_seed(2)
    return tiny_bert(num_labels=3, layers=2, heads=4)


def ids(batch=2, length=6):
    return torch.randint(5, 100, (batch, length), generator=torch.Generator().manual_seed(3))


def logits(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def mask_module(model, name):
    owner, _, attr = name.rpartition(".")
    return model.get_submodule(owner).parametrizations[attr][0]


def randomize(handle):
    """Random scores around the threshold, deltas and gate logits on every learnable mask."""
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for mask in (handle.weight_masks.masks().values() if handle.weight_masks else []):
            mask.scores.copy_(torch.randn(mask.scores.shape, generator=g) * 1e-2)
        for mask in (handle.diff_masks.masks().values() if handle.diff_masks else []):
            mask.delta.copy_(torch.randn(mask.delta.shape, generator=g))
            mask.gate.log_alpha.copy_(torch.randn(mask.delta.shape, generator=g) * 3)


# ------------------------------------------------------------------------------ the config


def test_heads_default_is_on_unless_tokens_or_parameter_masks_are_asked_for():
    assert lm.MaskConfig().heads is True
    assert lm.MaskConfig(ffn=True).granularities() == ("heads", "ffn")  # unchanged: unit gates add to heads
    assert lm.MaskConfig(freeze={"layers": 0}).heads is False
    assert lm.MaskConfig(tokens=True, token_layers=[0]).granularities() == ()
    assert lm.MaskConfig(heads=True, diff_masks={"pattern": "*"}).granularities() == ("heads",)
    assert lm.MaskConfig(ffn=True, freeze={"layers": 0}).granularities() == ("ffn",)
    with pytest.raises(ValueError, match="nothing to gate: .* or give one of freeze, weight_masks, diff_masks"):
        lm.MaskConfig(heads=False)


def test_a_toml_table_is_normalised_and_the_family_order_kept():
    config = lm.MaskConfig.from_dict({"freeze": {"layers": [0, 1], "pattern": ["a.*", "re:b"]},
                                      "diff_masks": {"pattern": "*.bias", "stretch": [-1, 2], "temperature": 1}})
    assert config.freeze == {"layers": (0, 1), "pattern": ("a.*", "re:b")}
    assert config.diff_masks == {"pattern": "*.bias", "stretch": (-1.0, 2.0), "temperature": 1.0}
    assert config.parameter_families() == ("freeze", "diff_masks")


@pytest.mark.parametrize("options, message", [
    (dict(freeze={"pattern": "0.*", "layer": 1}), r"unknown key\(s\) 'layer' in freeze; known: layers, pattern, "
                                                  r"predicate"),
    (dict(weight_masks={"pattern": "*", "init_log_alpha": 1}), r"unknown key\(s\) 'init_log_alpha' in weight_masks; "
                                                               r"known: layers, pattern, predicate, init, threshold"),
    (dict(freeze="0.*"), r"freeze must be a table of layers, pattern, predicate \(or None\); got str '0.\*'"),
    (dict(freeze={}), r"freeze needs at least one of layers, pattern, predicate to choose parameters; got \{\}"),
    (dict(freeze={"layers": [0, True]}), r"freeze.layers must be a layer index or a non-empty list of them"),
    (dict(freeze={"pattern": []}), r"freeze.pattern must be a glob .*; got \[\]"),
    (dict(freeze={"predicate": "yes"}), r"freeze.predicate must be a callable predicate\(name, parameter\)"),
    (dict(weight_masks={"pattern": "*", "init": "big"}), r"weight_masks.init must be a finite number; got 'big'"),
    (dict(diff_masks={"pattern": "*", "temperature": 0}), r"diff_masks.temperature must be > 0; got 0"),
    (dict(diff_masks={"pattern": "*", "stretch": [0.1, 1.1]}), r"gamma < 0 < 1 < zeta; got \[0.1, 1.1\]"),
])
def test_a_bad_table_is_refused_when_the_config_is_built(options, message):
    with pytest.raises(ValueError, match=message):
        lm.MaskConfig(**options)


# ------------------------------------------------------------------------------ freezing


def test_freeze_via_config_is_params_freeze_and_holds_under_adamw_with_weight_decay():
    selection = {"layers": [0], "pattern": "bert.embeddings.*"}
    model, reference = bert(), bert()
    handle = lm.apply_masks(model, freeze=selection)
    frozen = lm.freeze(reference, **selection)
    assert handle.frozen.names == frozen.names and len(frozen.names) > 10
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in reference.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    assert handle.attach_optimizer(optimizer) is optimizer
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert {n for n, p in named.items() if id(p) not in held} == set(frozen.names)
    before = {n: p.detach().clone() for n, p in named.items()}
    model.train()
    x, y = ids(), torch.tensor([0, 2])
    for _ in range(5):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x).logits, y).backward()
        optimizer.step()
    for name, param in named.items():
        assert torch.equal(param, before[name]) == (name in frozen.names), name


def test_freeze_alone_gates_no_heads_and_leaves_outputs_bit_identical():
    model, x = bert(), ids()
    expected = model(x).logits
    handle = lm.apply_masks(model, freeze={"layers": -1})
    assert handle.config.heads is False and handle.gated_names == () and handle.layers == []
    assert handle.parameter_families == ("freeze",)
    assert not model._forward_pre_hooks  # no sampling hook: nothing to sample
    assert torch.equal(model(x).logits, expected)
    model.train()
    assert torch.equal(model(x).logits, expected)  # dropout 0 in tiny_bert


def test_heads_with_freeze_when_asked():
    handle = lm.apply_masks(bert(), heads=True, freeze={"layers": 0})
    assert handle.gated_names == ("heads",) and handle.frozen is not None


# ------------------------------------------------------------------------------ weight and diff masks


def test_weight_masks_via_config_start_at_the_base_model_and_route_their_options():
    model, x = bert(), ids()
    expected = model(x).logits
    handle = lm.apply_masks(model, weight_masks={"pattern": "bert.encoder.layer.*.weight"})
    assert handle.weight_masks.names and all(".LayerNorm." in n or ".dense." in n or ".self." in n
                                             for n in handle.weight_masks.names)
    assert torch.equal(model(x).logits, expected)
    linear = nn.Linear(4, 3)
    lm.apply_masks(linear, weight_masks={"pattern": "weight", "init": 0.0, "threshold": 0.5})
    x = torch.randn(5, 4)
    assert torch.equal(linear(x), linear.bias.expand(5, 3))  # every entry below the threshold: w = 0


def test_diff_masks_via_config_start_at_the_base_model_and_export_strictly():
    model, x = mlp(), torch.randn(5, 4)
    expected = model(x)
    handle = lm.apply_masks(model, diff_masks={"pattern": ["2.*", "4.weight"], "init_log_alpha": 2.0,
                                               "temperature": 0.5, "stretch": [-0.5, 1.5]})
    assert handle.diff_masks.names == ("2.weight", "2.bias", "4.weight")
    gate = mask_module(model, "2.weight").gate
    assert torch.all(gate.log_alpha == 2.0) and gate.stretch == (-0.5, 1.5) and float(gate.temperature) == 0.5
    for mode in (True, False):
        model.train(mode)
        assert torch.equal(model(x), expected)  # delta = 0
    randomize(handle)
    model.eval()
    masked = model(x)
    assert not torch.allclose(masked, expected)
    plain = mlp()
    plain.load_state_dict(handle.export_weights(), strict=True)
    assert torch.equal(plain(x), masked)


def test_weight_and_diff_masks_together_export_one_plain_state_dict():
    model, x = mlp(), torch.randn(5, 4)
    handle = lm.apply_masks(model, **FAMILIES)
    randomize(handle)
    model.eval()
    plain = mlp()
    exported = handle.export_weights()
    plain.load_state_dict(exported, strict=True)
    assert torch.equal(plain(x), model(x))
    assert all(torch.equal(value, exported[key]) for key, value in lm.export_weights(handle).items())


def test_gate_and_base_parameters_split_as_param_groups_does():
    model = mlp()
    handle = lm.apply_masks(model, **FAMILIES)
    gates, base = list(handle.gate_parameters()), list(handle.base_parameters())
    groups = {g["name"]: {id(p) for p in g["params"]} for g in lm.param_groups(model, lr=1.0, weight_decay=0.1)}
    assert {id(p) for p in gates} == groups["gates"]  # scores of 2.weight, log_alpha of 4.weight and 4.bias
    assert [tuple(p.shape) for p in gates] == [(8, 8), (2, 8), (2,)]
    assert {id(p) for p in base if p.requires_grad} == groups["base"]  # 2.bias and the deltas
    assert {id(p) for p in gates} | {id(p) for p in base} == {id(p) for p in model.parameters()}
    assert [tuple(p.shape) for p in handle.mask_parameters()] == [(8, 8), (2, 8), (2,), (2, 8), (2,)]
    assert handle.dense_parameters() == sum(p.numel() for p in mlp().parameters()) == 40 + 72 + 18


def test_a_parameters_only_handle_has_no_unit_sizes():
    model = mlp()
    handle = lm.apply_masks(model, diff_masks={"pattern": "4.*"})
    assert handle.prunable_parameters() == 0 and handle.remaining_parameters() == handle.dense_parameters() == 130
    with pytest.raises(ValueError, match=r"expected_parameter_sparsity measures unit gates, and this handle has none "
                                         r"\(on: diff_masks\); for diff masks use handle.diff_masks.expected_density"):
        handle.expected_parameter_sparsity()
    with pytest.raises(ValueError, match=r"no 'heads' gate on this model; unit gates: none"):
        handle.keep_per_layer("heads")
    with pytest.raises(ValueError, match="finalize prunes unit gates, and this handle also carries diff_masks"):
        lm.finalize(handle)


# ------------------------------------------------------------------------------ persistence


def test_state_dict_round_trip_into_a_freshly_masked_model_is_bit_identical():
    model, x = mlp(), torch.randn(5, 4)
    handle = lm.apply_masks(model, **FAMILIES)
    randomize(handle)
    handle.diff_masks.magnitude_cut(0.5)
    state = copy.deepcopy(model.state_dict())
    fresh = mlp()
    again = lm.apply_masks(fresh, **FAMILIES)
    fresh.load_state_dict(state, strict=True)
    assert again.diff_masks.stage == "cut"
    assert all(torch.equal(value, fresh.state_dict()[key]) for key, value in state.items())
    model.eval(), fresh.eval()
    assert torch.equal(fresh(x), model(x))


def test_deepcopy_of_the_handle_is_bit_identical_and_independent():
    model, x = mlp(), torch.randn(5, 4)
    handle = lm.apply_masks(model, **FAMILIES)
    handle.attach_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    handle.mask_updates({"2.bias": torch.tensor([True, False] * 4)})
    randomize(handle)
    model.eval()
    expected = model(x)
    twin = copy.deepcopy(handle)
    assert twin.model is not model and twin.weight_masks.model is twin.model and twin.frozen.model is twin.model
    assert twin._optimizers == [] and twin.frozen._optimizers == [] and twin.update_masks._handles == []
    assert torch.equal(twin.model(x), expected)
    assert torch.equal(twin.update_masks.masks()["2.bias"], handle.update_masks.masks()["2.bias"])
    twin.remove()
    assert torch.equal(model(x), expected)  # the original keeps its masks
    assert [n for n, _ in twin.model.named_parameters()] == [n for n, _ in mlp().named_parameters()]


# ------------------------------------------------------------------------------ update masks


def test_mask_updates_hold_masked_entries_for_100_adamw_steps_and_can_be_replaced():
    model = mlp()
    handle = lm.apply_masks(model, freeze={"pattern": "4.*"})
    g = torch.Generator().manual_seed(5)
    first = torch.rand(8, 4, generator=g) < 0.5
    handle.mask_updates({"0.weight": first}, mode="hold")
    optimizer = handle.attach_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)

    def train(steps):
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()

    w0, top = model[0].weight.detach().clone(), model[4].weight.detach().clone()
    train(100)
    assert torch.equal(model[0].weight != w0, first)  # masked entries bit-identical, every kept one moved
    assert torch.equal(model[4].weight, top)
    second = ~first
    handle.mask_updates({model[0].weight: second})  # replaces the first; attached to the optimizer at once
    w1 = model[0].weight.detach().clone()
    train(10)
    assert torch.equal(model[0].weight != w1, second)
    assert handle.update_masks.density() == float(second.float().mean())


def test_a_mask_of_the_wrong_shape_is_refused_and_nothing_changes():
    model = mlp()
    handle = lm.apply_masks(model, freeze={"pattern": "4.*"})
    kept = handle.mask_updates({"0.bias": torch.ones(8, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"mask for '0.weight' has shape \(3,\); expected the parameter's shape "
                                         r"\(8, 4\)"):
        handle.mask_updates({"0.weight": torch.ones(3, dtype=torch.bool)})
    assert handle.update_masks is kept


def test_update_masks_for_an_optimizer_that_holds_none_of_them_are_refused():
    model = mlp()
    handle = lm.apply_masks(model, freeze={"pattern": "4.*"})
    handle.attach_optimizer(torch.optim.SGD(model[2].parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"none of the 1 attached optimizers holds a masked parameter"):
        handle.mask_updates({"0.bias": torch.ones(8, dtype=torch.bool)})
    assert handle.update_masks is None


# ------------------------------------------------------------------------------ bad input


def test_a_pattern_matching_nothing_names_the_family_and_changes_nothing():
    model = mlp()
    with pytest.raises(ValueError, match=r"freeze: pattern 'encoder\.\*' matches no parameter of Sequential; its "
                                         r"parameters are named like"):
        lm.apply_masks(model, freeze={"pattern": "encoder.*"})
    assert not hasattr(model, GATES_ATTRIBUTE) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="freeze: no transformer layers found in Sequential"):
        lm.apply_masks(model, freeze={"layers": 0})


def test_weight_and_diff_masks_on_one_parameter_are_refused_by_name():
    model = mlp()
    with pytest.raises(ValueError, match=r"weight_masks and diff_masks both choose '2.weight'; a parameter takes "
                                         r"one learnable mask"):
        lm.apply_masks(model, weight_masks={"pattern": "*.weight"}, diff_masks={"pattern": "2.*"})
    assert not hasattr(model, GATES_ATTRIBUTE)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in mlp().named_parameters()]


class WithScalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return self.scale * self.lin(x)


def test_an_error_after_freezing_rolls_the_model_back():
    model = WithScalar()
    with pytest.raises(ValueError, match=r"\['scale'\] are 0-d parameters"):
        lm.apply_masks(model, freeze={"pattern": "lin.*"}, diff_masks={"pattern": "scale"})
    assert not hasattr(model, GATES_ATTRIBUTE) and all(p.requires_grad for p in model.parameters())
    lm.apply_masks(model, freeze={"pattern": "lin.*"})  # and it can be masked again


# ------------------------------------------------------------------------------ with heads


def test_params_and_heads_on_one_handle_and_remove_restores_bit_identically():
    model, x = bert(), ids()
    names = [n for n, _ in model.named_parameters()]
    keys = list(model.state_dict())
    expected = model(x).logits
    handle = lm.apply_masks(model, heads=True, gate_options={"init_log_alpha": 0.0},
                            freeze={"pattern": "bert.embeddings.*"}, weight_masks={"layers": 1},
                            diff_masks={"pattern": "classifier.*"})
    assert handle.gated_names == ("heads",)
    assert handle.parameter_families == ("freeze", "weight_masks", "diff_masks")
    assert len(handle.weight_masks.names) == 16  # every parameter of layer 1
    gate_shapes = [tuple(p.shape) for p in handle.gate_parameters()]
    assert gate_shapes[0] == (2, 4) and (3, 32) in gate_shapes and (3,) in gate_shapes
    randomize(handle)
    assert not torch.allclose(model(x).logits, expected)  # half-open head gates and random masks
    with pytest.raises(ValueError, match="export_weights gives weights for the unmodified model, but this handle "
                                         "also gates heads"):
        handle.export_weights()
    handle.remove()
    assert handle.parameter_families == () and handle.frozen is None
    assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == keys
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(model(x).logits, expected)


def test_lm_front_door_names_are_the_params_objects():
    assert lm.freeze is params.freeze and lm.select_parameters is params.select_parameters
    assert lm.ParameterMasks is params.ParameterMasks and lm.export_weights is params.export_weights


def test_the_readme_front_door_example_runs_as_written():
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    code = next(c for c in re.findall(r"```python\n(.*?)```", text, re.S) if "handle.mask_updates(" in c)
    model = bert()
    batch = {"input_ids": ids(), "labels": torch.tensor([0, 2])}
    keep = torch.rand(3, 32, generator=torch.Generator().manual_seed(6)) < 0.5
    namespace = {"lm": lm, "torch": torch, "model": model, "keep": keep, "task_loss": model(**batch).loss,
                 "controller": lm.LagrangianController(lm.ConstantTarget(0.5))}
    exec(compile(code, "README.md", "exec"), namespace)
    handle = namespace["handle"]
    assert handle.gated_names == () and len(handle.diff_masks.names) == 16  # every parameter of the top layer
    assert set(handle.frozen.names) >= {"bert.embeddings.word_embeddings.weight",
                                        "bert.encoder.layer.0.output.dense.weight"}
    assert handle.update_masks._handles and torch.isfinite(namespace["loss"])
    plain = bert()
    plain.load_state_dict(namespace["plain_state"], strict=True)
    model.eval()
    assert torch.equal(plain(ids()).logits, model(ids()).logits)

"""Piggyback weight masks (Mallya et al. 2018; Zhao et al. 2020) and their persistence: the
straight-through gradient checked by hand, equality with the base model at init, frozen base
weights under AdamW with weight decay, deepcopy, state-dict round trips, export and removal."""
import copy

import pytest
import torch
from conftest import tiny_bert
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from learnmask.gates import param_groups
from learnmask.params.persist import export_weights
from learnmask.params.weight_mask import WeightMaskHandle, apply_weight_masks

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp():
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def snapshot(model):
    """Everything remove() must give back: keys in order, values, Parameter objects, flags, classes."""
    return ([(k, v.clone()) for k, v in model.state_dict().items()],
            [(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
            [type(m) for m in model.modules()])


def assert_same(model, before):
    state, params, classes = snapshot(model)
    assert [k for k, _ in state] == [k for k, _ in before[0]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(state, before[0]))
    assert params == before[1]
    assert classes == before[2]


# ------------------------------------------------------------------------------------ the mask


def test_straight_through_gradient_and_forward_by_hand():
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0]]))
        lin.bias.copy_(torch.tensor([0.5, -0.5]))
    handle = apply_weight_masks(lin, ["weight"])
    scores = handle.mask_parameters()[0]
    with torch.no_grad():
        scores[0, 1] = 0.0  # below 5e-3: entry (0, 1) is masked
        scores[1, 2] = 5e-3  # at the threshold: kept (>=)
    x = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 1.0, 2.0]])
    y = lin(x)
    # row 0 uses w = [1, 0, 0.5]; row 1 the whole [3, 0.25, -1]
    assert torch.equal(y, torch.tensor([[1.0 + 1.5 + 0.5, 3.0 + 0.5 - 3.0 - 0.5],
                                        [-1.0 + 1.0 + 0.5, -3.0 + 0.25 - 2.0 - 0.5]]))
    y.sum().backward()
    # dL/dw_ij = sum_b x_bj = [0, 3, 5]; straight-through: dL/dscore_ij = w0_ij * dL/dw_ij, masked entries too
    assert torch.equal(scores.grad, torch.tensor([[0.0, -6.0, 2.5], [0.0, 0.75, -5.0]]))
    assert lin.parametrizations.weight.original.grad is None
    assert handle.density() == 5 / 6


def test_init_equals_the_base_model_bit_for_bit():
    model = tiny_bert()
    ids = torch.randint(0, 100, (2, 7))
    before = model(input_ids=ids).logits
    names = [n for n, p in model.named_parameters() if p.dim() == 2]
    handle = apply_weight_masks(model, names)
    assert torch.equal(model(input_ids=ids).logits, before)
    assert handle.density() == 1.0
    assert handle.total == sum(p.numel() for n, p in tiny_bert().named_parameters() if n in names)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from([-1e-2, 0.0, 4.9e-3, 5e-3, 5.1e-3, 2e-2]), min_size=14, max_size=14))
def test_density_is_the_exact_fraction_of_kept_entries(values):
    model = mlp()
    handle = apply_weight_masks(model, ["0.weight", "2.bias"])
    with torch.no_grad():
        for scores, part in zip(handle.mask_parameters(), torch.tensor(values).split([12, 2])):
            scores.copy_(part.view(scores.shape))
    kept = sum(v >= 5e-3 for v in values)
    assert handle.density() == kept / 14
    assert sum(int(m.sum()) for m in handle.binary_masks().values()) == kept


def test_base_weights_never_change_under_adamw_with_weight_decay():
    torch.manual_seed(1)
    model = mlp()
    handle = apply_weight_masks(model, ["0.weight", "2.weight"])
    base = [model[i].parametrizations.weight.original for i in (0, 2)]
    frozen = [b.clone() for b in base]
    start = [s.clone() for s in handle.mask_parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # every parameter, frozen ones too
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    assert all(torch.equal(b, f) for b, f in zip(base, frozen))
    assert all(not b.requires_grad for b in base)
    assert not all(torch.equal(s, s0) for s, s0 in zip(handle.mask_parameters(), start))  # the scores trained
    assert handle.density() < 1.0


def test_param_groups_put_the_scores_in_the_no_decay_gate_group():
    model = mlp()
    handle = apply_weight_masks(model, ["0.weight"])
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, weight_decay=0.1)}
    assert [id(p) for p in groups["gates"]["params"]] == [id(p) for p in handle.mask_parameters()]
    assert groups["gates"]["weight_decay"] == 0.0
    assert [id(p) for p in groups["base"]["params"]] == [id(model[0].bias), id(model[2].weight), id(model[2].bias)]


def test_bad_arguments_are_named():
    model = mlp()
    with pytest.raises(ValueError, match=r"'0\.weigth' is not a parameter of Sequential; close names: 0\.weight"):
        apply_weight_masks(model, ["0.weigth"])
    with pytest.raises(TypeError, match=r"wrap it: \['0\.weight'\]"):
        apply_weight_masks(model, "0.weight")
    with pytest.raises(ValueError, match="empty"):
        apply_weight_masks(model, [])
    with pytest.raises(ValueError, match=r"names \['0\.bias'\] more than once"):
        apply_weight_masks(model, ["0.bias", "0.bias"])
    with pytest.raises(ValueError, match="init must be a finite number; got nan"):
        apply_weight_masks(model, ["0.bias"], init=float("nan"))
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        apply_weight_masks(model, ["0.bias"], threshold=None)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())  # nothing attached on error
    apply_weight_masks(model, ["0.bias"])
    with pytest.raises(ValueError, match=r"0\.bias is already parametrized \(WeightMask\)"):
        apply_weight_masks(model, ["0.bias"])


def test_tied_weights_are_refused():
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    model[1].weight = model[0].weight
    with pytest.raises(ValueError, match=r"shared under the names \['0\.weight', '1\.weight'\]"):
        apply_weight_masks(model, ["0.weight"])


# -------------------------------------------------------------------------------- persistence


def trained(seed=1):
    """A masked MLP whose masks are no longer all ones."""
    torch.manual_seed(seed)
    model = mlp()
    handle = apply_weight_masks(model, ["0.weight", "2.weight", "2.bias"])
    with torch.no_grad():
        for scores in handle.mask_parameters():
            scores.copy_(torch.randn(scores.shape) * 1e-2)
    assert 0.0 < handle.density() < 1.0
    return model, handle


def test_deepcopy_gives_identical_outputs_and_an_independent_model():
    model, handle = trained()
    x = torch.randn(5, 4)
    twin = copy.deepcopy(model)
    assert torch.equal(twin(x), model(x))
    twin_handle = WeightMaskHandle.from_model(twin)
    assert twin_handle.names == handle.names
    with torch.no_grad():
        twin_handle.mask_parameters()[0].fill_(-1.0)
    assert not torch.equal(twin(x), model(x))
    before = model(x)
    twin_handle.remove()  # taking the copy's masks off leaves the original masked and working
    assert torch.equal(model(x), before) and handle.density() < 1.0
    handle.remove()
    assert type(model[0]) is nn.Linear and type(twin[0]) is nn.Linear
    both = copy.deepcopy(trained()[1])  # a handle copies its model along
    assert both.density() == trained()[1].density()


def test_state_dict_loads_into_a_freshly_masked_model_bit_for_bit():
    model, handle = trained()
    torch.manual_seed(7)
    fresh = mlp()  # other base weights: the state dict brings them
    fresh_handle = apply_weight_masks(fresh, ["0.weight", "2.weight", "2.bias"])
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(5, 4)
    assert torch.equal(fresh(x), model(x))
    assert fresh_handle.density() == handle.density()


def test_a_mask_of_another_shape_is_named_at_load():
    model, _ = trained()
    other = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    apply_weight_masks(other, ["0.weight", "2.weight", "2.bias"])
    with pytest.raises(ValueError, match=r"WeightMask of 0\.weight: the state dict's 0\.parametrizations\.weight\.0"
                                         r"\.scores has shape \(3, 4\); expected \(5, 4\)"):
        other.load_state_dict(model.state_dict())
    state = model.state_dict()
    state["2.parametrizations.bias.0.scores"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"of 2\.bias: .* has shape \(3,\); expected \(2,\)"):
        model.load_state_dict(state)


def test_export_loads_strictly_into_the_plain_model_with_identical_outputs():
    torch.manual_seed(2)
    model = tiny_bert()
    plain = copy.deepcopy(model)
    names = ["bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.1.output.dense.weight",
             "classifier.weight", "classifier.bias"]
    handle = apply_weight_masks(model, names)
    with torch.no_grad():
        for scores in handle.mask_parameters():
            scores.copy_(torch.randn(scores.shape) * 1e-2)
    weights = export_weights(handle)
    assert set(weights) == set(plain.state_dict())
    masks = handle.binary_masks()
    for name in names:
        assert torch.equal(weights[name], plain.get_parameter(name) * masks[name])
    ids = torch.randint(0, 100, (3, 9))
    base = plain(input_ids=ids).logits
    plain.load_state_dict(weights, strict=True)
    assert torch.equal(plain(input_ids=ids).logits, model(input_ids=ids).logits)
    assert not torch.equal(plain(input_ids=ids).logits, base)  # the masks did change the model


def test_remove_leaves_the_model_bit_identical():
    model = mlp()
    model[2].bias.requires_grad_(False)  # a flag the user set: remove() gives it back
    before = snapshot(model)
    handle = apply_weight_masks(model, ["0.weight", "0.bias", "2.weight", "2.bias"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4)).sum().backward()
        opt.step()
    handle.remove()
    assert_same(model, before)
    with pytest.raises(RuntimeError, match="was removed"):
        handle.density()

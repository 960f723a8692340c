"""ParameterMasks: masks that hold at the optimizer update (bit-identical masked entries under AdamW
with weight decay and momentum), the zero mode that keeps a sparse net exactly sparse, grad_scale,
set_masks, remove, persistence and every input error."""
import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from learnmask.params import ParameterMasks

# Linear(4, 2).weight is (2, 4): a checkerboard keeps 4 of its 8 entries
CHECKER = torch.tensor([[True, False, True, False], [False, True, False, True]])


def train(model, optimizer, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        x = torch.randn(3, model.in_features, generator=g)
        (model(x) ** 2).sum().backward()
        optimizer.step()


def test_zero_mode_keeps_exactly_four_zeros_after_five_adam_steps():
    model = nn.Linear(4, 2)
    masks = ParameterMasks(model, {"weight": CHECKER}, mode="zero")
    assert int((model.weight == 0).sum()) == 4  # zeroed at once
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    masks.attach(optimizer)
    train(model, optimizer, 5)
    assert int((model.weight == 0).sum()) == 4
    assert torch.equal(model.weight == 0, ~CHECKER)
    assert masks.density() == 0.5


def test_zero_mode_holds_against_adam_moments_built_before_the_mask():
    # zeroed gradients alone would not do: the moments from unmasked steps keep moving the entries
    model = nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    train(model, optimizer, 3, seed=1)
    masks = ParameterMasks(model, {"weight": CHECKER}, mode="zero").attach(optimizer)
    train(model, optimizer, 5)
    assert torch.equal(model.weight == 0, ~CHECKER)
    masks.set_masks({"weight": ~CHECKER})  # the other half, zeroed at once and kept zero
    assert torch.equal(model.weight == 0, torch.ones(2, 4, dtype=torch.bool))
    train(model, optimizer, 5)
    assert torch.equal(model.weight == 0, CHECKER)


def test_a_mask_applied_once_and_not_re_applied_drifts_back_to_dense():
    # the fault zero mode prevents: Adam's moments and weight decay revive pruned weights
    model = nn.Linear(4, 2)
    masks = ParameterMasks(model, {"weight": CHECKER})
    masks.apply_to_weights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    train(model, optimizer, 5)
    assert int((model.weight == 0).sum()) == 0


@pytest.mark.parametrize("make", [lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
                                  lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1)],
                         ids=["adamw", "sgd-momentum"])
def test_masked_entries_are_bit_identical_after_100_steps(make):
    model = nn.Linear(4, 2)
    optimizer = make(model.parameters())
    train(model, optimizer, 3, seed=1)  # momentum and Adam moments built before the mask
    before = model.weight.detach().clone()
    bias_before = model.bias.detach().clone()
    ParameterMasks(model, {"weight": CHECKER}).attach(optimizer)
    train(model, optimizer, 100)
    assert torch.equal(model.weight[~CHECKER], before[~CHECKER])
    assert (model.weight[CHECKER] != before[CHECKER]).all()  # kept entries do change
    assert (model.bias != bias_before).all()  # and an unmasked parameter trains


def test_masking_only_the_gradient_lets_adamw_move_masked_entries():
    # the common fault (diffusers #1009): the gradient is masked, the update is not
    model = nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    before = model.weight.detach().clone()
    model.weight.register_hook(lambda grad: grad * CHECKER)
    train(model, optimizer, 100)
    assert (model.weight[~CHECKER] != before[~CHECKER]).all()


@settings(max_examples=15, deadline=None)
@given(st.lists(st.booleans(), min_size=8, max_size=8), st.integers(0, 2**16), st.sampled_from(["hold", "zero"]))
def test_masked_entries_never_move_whatever_the_mask(keep, seed, mode):
    torch.manual_seed(seed)
    model = nn.Linear(4, 2)
    mask = torch.tensor(keep).reshape(2, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1, betas=(0.5, 0.9))
    masks = ParameterMasks(model, {"weight": mask}, mode=mode).attach(optimizer)
    before = model.weight.detach().clone()
    train(model, optimizer, 5, seed=seed)
    assert torch.equal(model.weight[~mask], before[~mask])
    assert masks.density() == sum(keep) / 8


def linear_with_known_gradient(weight_value=0.0):
    """Linear(4, 2) without bias whose loss (W * C).sum() has gradient C = [[1..4], [5..8]]."""
    model = nn.Linear(4, 2, bias=False)
    nn.init.constant_(model.weight, weight_value)
    return model, torch.arange(1.0, 9.0).reshape(2, 4)


def sgd_step(model, optimizer, gradient):
    optimizer.zero_grad()
    (model.weight * gradient).sum().backward()
    optimizer.step()


def test_grad_scale_scales_kept_gradients_exactly():
    # Child-Tuning-F: keep with probability p = 0.25, scale by 1 / p = 4. Hand step of SGD with
    # lr 0.5 from W = 0: kept entries W - 0.5 * 4 * C = -2 C, masked entries stay 0.
    model, gradient = linear_with_known_gradient()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ParameterMasks(model, {"weight": CHECKER}, grad_scale=1 / 0.25).attach(optimizer)
    sgd_step(model, optimizer, gradient)
    expected = torch.tensor([[-2.0, 0.0, -6.0, 0.0], [0.0, -12.0, 0.0, -16.0]])
    assert torch.equal(model.weight.detach(), expected)
    assert torch.equal(model.weight.grad, expected / -0.5)  # the gradient the optimizer saw


def test_set_masks_between_steps():
    model, gradient = linear_with_known_gradient(1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    masks = ParameterMasks(model, {"weight": CHECKER}, grad_scale={"weight": 2.0}).attach(optimizer)
    sgd_step(model, optimizer, gradient)  # kept: 1 - 0.5 * 2 * C = 1 - C
    first = torch.tensor([[0.0, 1.0, -2.0, 1.0], [1.0, -5.0, 1.0, -7.0]])
    assert torch.equal(model.weight.detach(), first)
    row0 = torch.tensor([[True] * 4, [False] * 4])
    masks.set_masks({"weight": row0})  # grad_scale kept (2)
    sgd_step(model, optimizer, gradient)
    assert torch.equal(model.weight.detach(), torch.cat([first[:1] - gradient[:1], first[1:]]))
    masks.set_masks({"weight": ~row0}, grad_scale=1.0)  # scaling stopped
    sgd_step(model, optimizer, gradient)
    assert torch.equal(model.weight.detach()[1], first[1] - 0.5 * gradient[1])


def test_remove_restores_plain_optimizer_behaviour():
    model, gradient = linear_with_known_gradient(1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    masks = ParameterMasks(model, {"weight": CHECKER}, grad_scale=4.0).attach(optimizer)
    masks.remove()
    sgd_step(model, optimizer, gradient)
    assert torch.equal(model.weight.detach(), 1 - 0.5 * gradient)
    assert torch.equal(masks.masks()["weight"], CHECKER)  # the masks are kept, only detached
    masks.attach(optimizer)  # and can be attached again
    sgd_step(model, optimizer, gradient)
    assert torch.equal(model.weight.detach()[~CHECKER], (1 - 0.5 * gradient)[~CHECKER])


def test_a_closure_step_still_holds_masked_entries():
    model, gradient = linear_with_known_gradient(1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ParameterMasks(model, {"weight": CHECKER}).attach(optimizer)

    def closure():
        optimizer.zero_grad()
        loss = (model.weight * gradient).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    assert torch.equal(model.weight.detach(), torch.where(CHECKER, 1 - 0.5 * gradient, 1.0))


def test_only_the_attached_optimizers_parameters_are_touched():
    # two optimizers over one model: each applies grad_scale to its own parameters only, once
    model = nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 2, bias=False))
    for layer in model:
        nn.init.zeros_(layer.weight)
    first = torch.optim.SGD(model[0].parameters(), lr=1.0)
    second = torch.optim.SGD(model[1].parameters(), lr=1.0)
    masks = ParameterMasks(model, {"0.weight": torch.ones(2, 4, dtype=torch.bool),
                                   "1.weight": torch.ones(2, 2, dtype=torch.bool)}, grad_scale=2.0)
    masks.attach(first)
    masks.attach(second)
    for layer in model:
        layer.weight.grad = torch.ones_like(layer.weight)
    first.step()
    second.step()
    assert torch.equal(model[0].weight.detach(), torch.full((2, 4), -2.0))
    assert torch.equal(model[1].weight.detach(), torch.full((2, 2), -2.0))


def test_state_dict_round_trip_is_bit_identical(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 3))
    wanted = {"0.weight": torch.rand(2, 4) < 0.5, "1.bias": torch.tensor([True, False, True])}
    masks = ParameterMasks(model, wanted)
    state = masks.state_dict()
    save_file(state, tmp_path / "masks.safetensors")
    fresh = ParameterMasks(copy.deepcopy(model), {"1.weight": torch.ones(3, 2, dtype=torch.bool)})
    fresh.load_state_dict(load_file(tmp_path / "masks.safetensors"))
    assert list(fresh.masks()) == ["0.weight", "1.bias"]
    for name, mask in wanted.items():
        assert fresh.masks()[name].dtype == torch.bool
        assert torch.equal(fresh.masks()[name], mask)
    state["1.bias"][0] = False  # state_dict hands out copies
    assert torch.equal(masks.masks()["1.bias"], wanted["1.bias"])


def test_masks_are_copies_of_what_was_given():
    given_mask = CHECKER.clone()
    masks = ParameterMasks(nn.Linear(4, 2), {"weight": given_mask})
    given_mask.fill_(True)
    assert masks.density() == 0.5


def test_deepcopy_is_independent_and_detached():
    model = nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    masks = ParameterMasks(model, {"weight": CHECKER}).attach(optimizer)
    twin_model, twin = copy.deepcopy((model, masks))
    assert twin.model is twin_model and twin_model is not model
    assert torch.equal(twin.masks()["weight"], CHECKER)
    twin.remove()  # removes nothing of the original's
    before = model.weight.detach().clone()
    train(model, optimizer, 10)
    assert torch.equal(model.weight[~CHECKER], before[~CHECKER])
    twin_optimizer = torch.optim.AdamW(twin_model.parameters(), lr=0.1, weight_decay=0.1)
    twin.attach(twin_optimizer)
    twin_before = twin_model.weight.detach().clone()
    train(twin_model, twin_optimizer, 10)
    assert torch.equal(twin_model.weight[~CHECKER], twin_before[~CHECKER])


def test_density_per_parameter_and_overall():
    model = nn.Linear(4, 2)
    masks = ParameterMasks(model, {"weight": CHECKER, "bias": torch.tensor([True, True])})
    assert masks.density("weight") == 0.5
    assert masks.density("bias") == 1.0
    assert masks.density() == 6 / 10
    with pytest.raises(ValueError, match=r"no mask for 'nope'; masked: \['bias', 'weight'\]"):
        masks.density("nope")


def test_mask_keys_may_be_the_parameters_themselves():
    model = nn.Linear(4, 2)
    masks = ParameterMasks(model, {model.weight: CHECKER})
    assert list(masks.masks()) == ["weight"]


def test_unknown_name_lists_close_names():
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'0.wieght' names no parameter of Sequential; its parameters are named "
                                         r"like '0.weight', '0.bias'"):
        ParameterMasks(model, {"0.wieght": CHECKER})


def test_shape_mismatch_names_both_shapes():
    model = nn.Linear(8, 2)
    with pytest.raises(ValueError) as err:
        ParameterMasks(model, {"weight": torch.ones(2, 7, dtype=torch.bool)})
    assert str(err.value) == "mask for 'weight' has shape (2, 7); expected the parameter's shape (2, 8)"


@pytest.mark.parametrize("mask", [CHECKER.float(), CHECKER.tolist()], ids=["float", "list"])
def test_a_mask_must_be_a_bool_tensor(mask):
    with pytest.raises(TypeError, match="mask for 'weight' is (torch.float32|list); expected a torch.bool tensor"):
        ParameterMasks(nn.Linear(4, 2), {"weight": mask})


def test_a_parameter_of_another_model_is_refused():
    other = nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"a tensor of shape \(2, 4\) given as a mask key is not a parameter of "
                                         r"Linear"):
        ParameterMasks(nn.Linear(4, 2), {other.weight: CHECKER})


def test_one_parameter_twice_is_refused():
    model = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="two masks for 'weight'"):
        ParameterMasks(model, {"weight": CHECKER, model.weight: CHECKER})


@pytest.mark.parametrize("masks", [{}, None, [("weight", CHECKER)]])
def test_masks_must_be_a_non_empty_mapping(masks):
    with pytest.raises(ValueError, match="masks must be a non-empty mapping"):
        ParameterMasks(nn.Linear(4, 2), masks)


@pytest.mark.parametrize("scale, message", [(0.0, "grad_scale for 'weight' is 0.0; expected a finite number > 0"),
                                            (-1, "is -1; expected"), (math.nan, "is nan; expected"),
                                            (True, "is True; expected"),
                                            ({"bias": 2.0}, "grad_scale names 'bias', which has no mask")])
def test_bad_grad_scale(scale, message):
    with pytest.raises(ValueError, match=message):
        ParameterMasks(nn.Linear(4, 2), {"weight": CHECKER}, grad_scale=scale)


def test_a_failed_set_masks_changes_nothing():
    masks = ParameterMasks(nn.Linear(4, 2), {"weight": CHECKER})
    with pytest.raises(ValueError, match="has shape"):
        masks.set_masks({"weight": torch.ones(3, 4, dtype=torch.bool)})
    assert torch.equal(masks.masks()["weight"], CHECKER)


def test_bad_mode():
    with pytest.raises(ValueError, match=r"mode 'sparse' is not one of \('hold', 'zero'\)"):
        ParameterMasks(nn.Linear(4, 2), {"weight": CHECKER}, mode="sparse")


def test_attach_refuses_another_models_optimizer_and_a_second_attach():
    model = nn.Linear(4, 2)
    masks = ParameterMasks(model, {"weight": CHECKER})
    with pytest.raises(ValueError, match="SGD holds none of the masked parameters of Linear"):
        masks.attach(torch.optim.SGD(copy.deepcopy(model).parameters(), lr=0.1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    masks.attach(optimizer)
    with pytest.raises(ValueError, match="already attached to this SGD"):
        masks.attach(optimizer)


def test_sparse_gradients_are_refused():
    model = nn.Embedding(4, 2, sparse=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ParameterMasks(model, {"weight": torch.ones(4, 2, dtype=torch.bool)}).attach(optimizer)
    model(torch.tensor([1])).sum().backward()
    with pytest.raises(TypeError, match="'weight' has a sparse gradient"):
        optimizer.step()

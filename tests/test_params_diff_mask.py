"""Diff masks (Guo, Rush & Kim 2021): w = w0 + z ⊙ delta with hard-concrete z. Values by hand,
the expected L0 driven to a budget by the Lagrangian controller, the exact magnitude cut, the
fixed-mask stage under AdamW with weight decay, deepcopy, state-dict round trips, export, removal."""
import copy
import math

import pytest
import torch
from conftest import tiny_bert
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from learnmask.control import LagrangianController
from learnmask.params.diff_mask import DiffMaskHandle, apply_diff_masks
from learnmask.params.persist import export_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp():
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


ALL = ["0.weight", "0.bias", "2.weight", "2.bias"]


def set_(tensor, values):
    with torch.no_grad():
        tensor.copy_(torch.as_tensor(values, dtype=tensor.dtype).view(tensor.shape))


def randomize(model):
    """Random deltas and gate logits (log_alpha ~ N(0, 9)) on every masked parameter of ``ALL``."""
    for name in ALL:
        set_(mask_of(model, name).delta, torch.randn(mask_of(model, name).delta.shape))
        set_(mask_of(model, name).gate.log_alpha, torch.randn(mask_of(model, name).delta.shape) * 3)


def mask_of(model, name):
    owner, _, attr = name.rpartition(".")
    return model.get_submodule(owner).parametrizations[attr][0]


# ------------------------------------------------------------------------------------ stage (a)


def test_init_equals_the_base_model_in_train_and_eval():
    model = mlp()
    x = torch.randn(5, 4)
    before = model(x)
    handle = apply_diff_masks(model, ALL)
    assert torch.equal(model(x), before)  # training mode: z sampled, delta = 0
    assert torch.equal(model.eval()(x), before)
    assert handle.stage == "l0"
    assert all(not model.get_submodule(n[0]).parametrizations[n[2:]].original.requires_grad for n in ALL)


def test_expected_l0_at_init_and_its_gradient():
    model = mlp()
    handle = apply_diff_masks(model, ALL)  # paper's code: log_alpha 5, β = 1, stretch (-1.5, 1.5)
    p = 1.0 / (1.0 + math.exp(-5.0))  # P(z != 0) = sigmoid(5 - β log(1.5 / 1.5))
    l0 = handle.expected_l0()
    assert handle.total == 23
    assert math.isclose(float(l0.detach()), 23 * p, rel_tol=1e-6)
    assert math.isclose(float(handle.expected_density().detach()), p, rel_tol=1e-6)
    l0.backward()
    grad = mask_of(model, "0.weight").gate.log_alpha.grad
    assert torch.allclose(grad, torch.full((3, 4), p * (1 - p)), rtol=1e-5)


def test_eval_weight_by_hand_and_training_samples():
    lin = nn.Linear(2, 2)
    w0 = lin.weight.detach().clone()
    handle = apply_diff_masks(lin, ["weight"])
    mask = mask_of(lin, "weight")
    set_(mask.delta, [[1.0, 2.0], [3.0, 4.0]])
    set_(mask.gate.log_alpha, [[5.0, 0.0], [-5.0, 5.0]])  # z_eval = clamp(3 sigmoid(a) - 1.5, 0, 1) = [[1, 0], [0, 1]]
    lin.eval()
    assert torch.equal(lin.weight, w0 + torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
    assert torch.equal(lin.weight, lin.weight)  # deterministic
    lin.train()
    draws = torch.stack([lin.weight - w0 for _ in range(200)])
    z = draws / torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert z.min() >= 0 and z.max() <= 1
    assert 0.2 < (z[:, 0, 1] > 0).float().mean() < 0.8  # log_alpha 0: P(z != 0) = 1/2
    assert (z[:, 1, 0] > 0).float().mean() < 0.05  # log_alpha -5: P(z != 0) = sigmoid(-5) ≈ 0.0067
    lin.weight.sum().backward()
    assert mask.delta.grad is not None and mask.gate.log_alpha.grad is not None
    assert handle.mask_parameters() == [mask.delta, mask.gate.log_alpha]


def test_the_lagrangian_controller_drives_expected_density_to_the_budget():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    x, y = torch.randn(64, 8), torch.randn(64, 2)
    handle = apply_diff_masks(model, [n for n, _ in model.named_parameters()])
    budget = 0.3

    def train(controller, steps):
        opt = torch.optim.Adam([{"params": handle.delta_parameters(), "lr": 1e-2},
                                {"params": handle.gate_parameters(), "lr": 0.1}])
        for _ in range(steps):
            loss = nn.functional.mse_loss(model(x), y)
            if controller is not None:
                loss = loss + controller.penalty(1 - handle.expected_density())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if controller is not None:
                controller.step()
        return float(handle.expected_density().detach())

    state = copy.deepcopy(model.state_dict())
    assert train(None, 50) > 0.9  # the task alone keeps the diff dense
    model.load_state_dict(state)
    assert abs(train(LagrangianController(1 - budget), 250) - budget) < 0.02  # settles from step ~95 on


# ------------------------------------------------------------------------------------ stage (b)


def hand_model():
    """Linear(3, 2) with |z_eval ⊙ delta| = [[4, 1.5, 0], [2.5, 1, 0.25]] (stretch (-0.1, 1.1):
    log_alpha 5 -> z 1, 0 -> z 0.5 exactly, -5 -> z 0)."""
    lin = nn.Linear(3, 2)
    handle = apply_diff_masks(lin, ["weight"], stretch=(-0.1, 1.1), temperature=2 / 3)
    mask = mask_of(lin, "weight")
    set_(mask.delta, [[4.0, 3.0, 100.0], [-2.5, 1.0, 0.5]])
    set_(mask.gate.log_alpha, [[5.0, 0.0, -5.0], [5.0, 5.0, 0.0]])
    return lin, handle, mask


def test_magnitude_cut_keeps_the_largest_z_eval_delta_by_hand():
    lin, handle, mask = hand_model()
    assert handle.magnitude_cut(0.5) == 3
    assert torch.equal(handle.kept_masks()["weight"], torch.tensor([[True, True, False], [True, False, False]]))
    assert handle.magnitude_cut(1 / 3) == 2  # a second cut replaces the first
    assert torch.equal(mask.kept, torch.tensor([[True, False, False], [True, False, False]]))
    assert handle.stage == "cut"
    x = torch.randn(4, 3)
    lin.eval()
    before = lin(x)
    assert torch.equal(lin(x), before)  # the cut alone changes nothing


def test_magnitude_cut_ranks_all_parameters_jointly_ties_to_the_first():
    model = mlp()
    handle = apply_diff_masks(model, ["2.bias", "0.bias"])
    set_(mask_of(model, "2.bias").delta, [1.0, 2.0])
    set_(mask_of(model, "0.bias").delta, [2.0, -2.0, 0.5])
    assert handle.magnitude_cut(0.4) == 2  # round(0.4 * 5): the three 2.0s tie; names order, then row-major
    assert handle.kept_masks()["2.bias"].tolist() == [False, True]
    assert handle.kept_masks()["0.bias"].tolist() == [True, False, False]


@settings(max_examples=40, deadline=None)
@given(budget=st.floats(0.05, 1.0), seed=st.integers(0, 2**16))
def test_magnitude_cut_keeps_exactly_round_budget_total_of_the_largest(budget, seed):
    torch.manual_seed(seed)
    model = mlp()
    handle = apply_diff_masks(model, ALL)
    randomize(model)
    k = handle.magnitude_cut(budget)
    kept = handle.kept_masks()
    assert k == round(budget * 23) == sum(int(m.sum()) for m in kept.values())
    scores = torch.cat([mask_of(model, n).cut_scores().flatten() for n in ALL])
    flags = torch.cat([kept[n].flatten() for n in ALL])
    if 0 < k < 23:
        assert scores[flags].min() >= scores[~flags].max()


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5, float("nan"), True, "0.5", None])
def test_a_budget_outside_zero_one_is_refused(budget):
    _, handle, _ = hand_model()
    with pytest.raises(ValueError, match=r"budget must be a fraction of entries in \(0, 1\]"):
        handle.magnitude_cut(budget)


def test_a_budget_that_keeps_nothing_is_refused():
    _, handle, _ = hand_model()
    with pytest.raises(ValueError, match=r"keeps round\(0.05 \* 6\) = 0 of the 6 entries; expected a budget of at "
                                         r"least 0.0833"):
        handle.magnitude_cut(0.05)


# ------------------------------------------------------------------------------------ stage (c)


def test_fix_mask_folds_z_eval_into_delta_and_stops_sampling():
    lin, handle, mask = hand_model()
    with pytest.raises(RuntimeError, match="magnitude_cut"):
        handle.fix_mask()
    handle.magnitude_cut(0.5)
    w0 = lin.parametrizations.weight.original.detach().clone()
    handle.fix_mask()
    assert torch.equal(mask.delta, torch.tensor([[4.0, 1.5, 0.0], [-2.5, 0.0, 0.0]]))
    lin.train()
    assert torch.equal(lin.weight, w0 + mask.delta) and torch.equal(lin.weight, lin.weight)  # no sampling
    lin.eval()
    assert torch.equal(lin.weight, w0 + mask.delta)
    assert handle.stage == "fixed" and handle.gate_parameters() == [] and handle.mask_parameters() == [mask.delta]
    assert float(handle.expected_l0()) == 3.0 and float(handle.expected_density()) == 0.5
    with pytest.raises(RuntimeError, match="fixed already"):
        handle.fix_mask()
    with pytest.raises(RuntimeError, match="fixed already"):
        handle.magnitude_cut(0.5)


def test_fixed_mask_finetuning_moves_only_kept_delta_under_adamw_with_weight_decay():
    torch.manual_seed(4)
    model = mlp()
    handle = apply_diff_masks(model, ALL)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(20):  # stage (a)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    handle.magnitude_cut(0.25)
    handle.fix_mask()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kept = {n: mask_of(model, n).kept.clone() for n in ALL}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # fresh, over every parameter
    for _ in range(100):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    after = model.state_dict()
    for key in before:
        name = next(n for n in ALL if key.startswith(n.replace(".", ".parametrizations.", 1) + "."))
        if key.endswith(".delta"):
            assert torch.equal(after[key][~kept[name]], torch.zeros(int((~kept[name]).sum())))
            assert (after[key][kept[name]] != before[key][kept[name]]).all()  # every kept entry trained
        else:
            assert torch.equal(after[key], before[key]), key  # w0, log_alpha, kept, stage
    assert float(handle.expected_l0()) == round(0.25 * 23) == sum(int(k.sum()) for k in kept.values())


def test_linear_4_2_at_half_keep_has_exactly_4_zeros_after_5_adam_steps():
    torch.manual_seed(8)
    lin = nn.Linear(4, 2)
    w0 = lin.weight.detach().clone()
    handle = apply_diff_masks(lin, ["weight"])
    set_(mask_of(lin, "weight").delta, torch.randn(2, 4))
    assert handle.magnitude_cut(0.5) == 4
    handle.fix_mask()
    opt = torch.optim.Adam(handle.mask_parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        lin(torch.randn(8, 4)).pow(2).sum().backward()
        opt.step()
    assert int((lin.weight - w0 == 0).sum()) == 4
    assert torch.equal(lin.weight - w0 == 0, ~handle.kept_masks()["weight"])


# --------------------------------------------------------------------------------- persistence


def staged(stage, seed=5):
    """A masked MLP trained in stage (a) and brought to ``stage``."""
    torch.manual_seed(seed)
    model = mlp()
    handle = apply_diff_masks(model, ALL)
    randomize(model)
    if stage != "l0":
        handle.magnitude_cut(0.5)
    if stage == "fixed":
        handle.fix_mask()
    return model, handle


@pytest.mark.parametrize("stage", ["l0", "fixed"])
def test_deepcopy_gives_identical_outputs(stage):
    model, handle = staged(stage)
    x = torch.randn(5, 4)
    twin = copy.deepcopy(model)
    torch.manual_seed(0)
    sampled = model(x)
    torch.manual_seed(0)
    assert torch.equal(twin(x), sampled)  # training mode, same noise
    evaluated = model.eval()(x)
    assert torch.equal(twin.eval()(x), evaluated)
    twin_handle = DiffMaskHandle.from_model(twin)
    assert twin_handle.names == handle.names and twin_handle.stage == stage
    twin_handle.remove()  # the copy's masks come off; the original keeps its own
    assert torch.equal(model(x), evaluated) and handle.stage == stage
    assert not torch.equal(twin(x), evaluated)


@pytest.mark.parametrize("stage", ["l0", "cut", "fixed"])
def test_state_dict_loads_into_a_freshly_masked_model_bit_for_bit(stage):
    model, handle = staged(stage)
    torch.manual_seed(9)
    fresh = mlp()
    fresh_handle = apply_diff_masks(fresh, ALL)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert fresh_handle.stage == stage
    assert len(fresh_handle.gate_parameters()) == (0 if stage == "fixed" else 4)
    assert all(mask_of(fresh, n).gate.log_alpha.requires_grad == (stage != "fixed") for n in ALL)
    x = torch.randn(5, 4)
    torch.manual_seed(1)
    sampled = model(x)
    torch.manual_seed(1)
    assert torch.equal(fresh(x), sampled)
    assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_a_mask_of_another_shape_is_named_at_load():
    model, _ = staged("l0")
    other = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    apply_diff_masks(other, ALL)
    with pytest.raises(ValueError, match=r"DiffMask of 0\.weight: the state dict's 0\.parametrizations\.weight\.0"
                                         r"\.delta has shape \(3, 4\); expected \(5, 4\)"):
        other.load_state_dict(model.state_dict())


@pytest.mark.parametrize("stage", ["l0", "fixed"])
def test_export_loads_strictly_into_the_plain_model_with_identical_outputs(stage):
    torch.manual_seed(6)
    model = tiny_bert()
    plain = copy.deepcopy(model)
    names = ["bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.value.weight",
             "bert.encoder.layer.1.intermediate.dense.bias", "classifier.weight"]
    handle = apply_diff_masks(model, names)
    for name in names:
        shape = mask_of(model, name).delta.shape
        set_(mask_of(model, name).delta, torch.randn(shape) * 0.1)
        set_(mask_of(model, name).gate.log_alpha, torch.randn(shape) * 3)  # z_eval fractional on many entries
    if stage == "fixed":
        handle.magnitude_cut(0.1)
        handle.fix_mask()
    weights = export_weights(handle)
    assert set(weights) == set(plain.state_dict())
    for name in names:
        mask = mask_of(model, name)
        assert torch.equal(weights[name], plain.get_parameter(name) + mask.eval_gate() * mask.delta)
    ids = torch.randint(0, 100, (3, 9))
    base = plain(input_ids=ids).logits
    plain.load_state_dict(weights, strict=True)
    model.eval()
    assert torch.equal(plain(input_ids=ids).logits, model(input_ids=ids).logits)
    assert not torch.equal(plain(input_ids=ids).logits, base)


def test_remove_leaves_the_model_bit_identical_after_training():
    model = mlp()
    state = [(k, v.clone()) for k, v in model.state_dict().items()]
    params = [(n, id(p), p.requires_grad) for n, p in model.named_parameters()]
    handle = apply_diff_masks(model, ALL)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4)).sum().backward()
        opt.step()
    handle.remove()
    assert [k for k, _ in model.state_dict().items()] == [k for k, _ in state]
    assert all(torch.equal(v, s) for v, (_, s) in zip(model.state_dict().values(), state))
    assert [(n, id(p), p.requires_grad) for n, p in model.named_parameters()] == params
    assert [type(m) for m in model] == [nn.Linear, nn.Tanh, nn.Linear]


def test_bad_arguments_are_named():
    model = nn.Sequential(nn.Linear(2, 2))
    model.scale = nn.Parameter(torch.tensor(2.0))
    with pytest.raises(ValueError, match=r"\['scale'\] are 0-d parameters"):
        apply_diff_masks(model, ["0.weight", "scale"])
    with pytest.raises(ValueError, match="init_log_alpha must be a finite number"):
        apply_diff_masks(model, ["0.weight"], init_log_alpha=float("inf"))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        apply_diff_masks(model, ["0.weight"], temperature=0.0)
    with pytest.raises(ValueError, match="gamma < 0 < 1 < zeta"):
        apply_diff_masks(model, ["0.weight"], stretch=(0.1, 1.1))
    with pytest.raises(ValueError, match=r"'0\.wieght' is not a parameter of Sequential; close names: 0\.weight"):
        apply_diff_masks(model, ["0.wieght"])
    assert not hasattr(model[0], "parametrizations")  # nothing attached on error

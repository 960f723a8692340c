"""Value and invariance tests for learnmask.gates."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from learnmask import functional as F
from learnmask.gates import (
    FixedGate,
    Gate,
    GumbelSigmoidGate,
    HardConcreteGate,
    ThresholdGate,
    TopKGate,
    available_gates,
    make_gate,
    param_groups,
    register_gate,
)

ALL_KINDS = ["fixed", "gumbel_sigmoid", "hard_concrete", "threshold", "topk"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _build(name: str, shape=(3, 4)) -> Gate:
    """A gate of each kind with distinct (non-tied, non-default) log_alpha."""
    torch.manual_seed(0)
    if name == "fixed":
        return make_gate("fixed", shape, keep=5, generator=_gen(1))
    gate = make_gate(name, shape)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.randn(shape, generator=_gen(2)) * 3)
    return gate


# ------------------------------------------------------------------------------ registry


def test_registry_lists_builtin_kinds():
    assert available_gates() == ALL_KINDS
    assert isinstance(make_gate("hard_concrete", (2, 3)), HardConcreteGate)
    assert isinstance(make_gate("topk", (4,), k=2), TopKGate)
    assert isinstance(make_gate("threshold", (4,)), ThresholdGate)
    assert isinstance(make_gate("gumbel_sigmoid", (4,)), GumbelSigmoidGate)
    assert isinstance(make_gate("fixed", (4,)), FixedGate)


def test_registry_unknown_name_lists_known():
    with pytest.raises(ValueError, match=r"unknown gate 'hard_concret'; known gates: fixed, "
                                         r"gumbel_sigmoid, hard_concrete, threshold, topk"):
        make_gate("hard_concret", (2,))


def test_registry_duplicate_and_unknown_kwarg():
    with pytest.raises(ValueError, match="already registered"):
        register_gate("topk")(type("Other", (Gate,), {}))
    with pytest.raises(TypeError, match="temprature"):
        make_gate("hard_concrete", (2,), temprature=0.5)


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("name", ALL_KINDS)
@pytest.mark.parametrize("shape", [(0, 3), (-1,), (2.5,), "ab", (2, True), ()])
def test_bad_shape(name, shape):
    with pytest.raises(ValueError, match=r"shape must be a non-empty tuple of positive ints"):
        make_gate(name, shape)


@pytest.mark.parametrize("name", ["hard_concrete", "topk", "threshold", "gumbel_sigmoid"])
@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_bad_init_keep_ratio(name, ratio):
    with pytest.raises(ValueError, match=rf"init_keep_ratio must be in \(0, 1\]; got {ratio}"):
        make_gate(name, (4,), init_keep_ratio=ratio)


@pytest.mark.parametrize("name", ["hard_concrete", "gumbel_sigmoid"])
def test_bad_temperature(name):
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0; got -0.5"):
        make_gate(name, (4,), temperature=-0.5)


def test_bad_init_combinations():
    with pytest.raises(ValueError, match="not both"):
        HardConcreteGate((3,), init_log_alpha=1.0, init_keep_ratio=0.5)
    with pytest.raises(ValueError, match="not both"):
        TopKGate((3,), k=1, init_keep_ratio=0.5)
    with pytest.raises(ValueError, match=r"broadcastable to \(3,\)"):
        HardConcreteGate((3,), init_log_alpha=torch.zeros(4))
    with pytest.raises(ValueError, match=r"stretch"):
        HardConcreteGate((3,), stretch=(0.1, 1.1))
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\)"):
        ThresholdGate((3,), threshold=1.0)


@pytest.mark.parametrize("name", ALL_KINDS)
def test_bad_eval_k(name):
    gate = _build(name)
    with pytest.raises(ValueError, match=r"eval_k must be None or an int in \[0, numel\] = "
                                         r"\[0, 12\].*got 13"):
        gate.eval_k = 13
    with pytest.raises(ValueError, match=r"\[0, 12\].*got -1"):
        gate.deterministic_mask(-1)


# ------------------------------------------------------------------------------ case G1


def test_g1_hard_concrete_default_init_and_values():
    gate = HardConcreteGate((2, 3))
    assert torch.equal(gate.log_alpha.detach(), torch.full((2, 3), 3.0))
    gate.eval()
    assert torch.equal(gate(), torch.ones(2, 3))  # 3.0 >= log(11): deterministic gate fully open
    with torch.no_grad():
        gate.log_alpha.zero_()
    assert torch.equal(gate(), torch.full((2, 3), 0.5))
    assert gate.expected_l0().item() == pytest.approx(6 * 0.831822, abs=1e-5)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_g1_l0_penalty_decreases_prob_nonzero_every_step(opt_name):
    gate = HardConcreteGate((4,))
    opt_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[opt_name]
    opt = opt_cls(gate.parameters(), lr=0.05)
    previous = F.prob_nonzero(gate.log_alpha).detach()
    for _ in range(20):
        opt.zero_grad()
        loss = 0.0 * gate().sum() + 0.1 * gate.expected_l0()  # zero task loss + L0 weight 0.1
        loss.backward()
        opt.step()
        current = F.prob_nonzero(gate.log_alpha).detach()
        assert torch.all(current < previous)
        previous = current


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_g1_zero_l0_weight_does_not_move(opt_name):
    gate = HardConcreteGate((4,))
    opt_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[opt_name]
    opt = opt_cls(gate.parameters(), lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        (0.0 * gate().sum() + 0.0 * gate.expected_l0()).backward()
        opt.step()
    assert torch.equal(gate.log_alpha.detach(), torch.full((4,), 3.0))


def test_g1_adamw_param_groups_do_not_decay_gates():
    model = nn.Module()
    model.linear = nn.Linear(3, 3)
    model.gate = HardConcreteGate((2, 3))
    weight_before = model.linear.weight.detach().clone()
    opt = torch.optim.AdamW(param_groups(model, lr=0.1, weight_decay=0.1))
    for _ in range(5):
        opt.zero_grad()
        (0.0 * (model.linear.weight.sum() + model.gate().sum())).backward()
        opt.step()
    assert torch.equal(model.gate.log_alpha.detach(), torch.full((2, 3), 3.0))
    expected = weight_before * (1 - 0.1 * 0.1) ** 5  # decoupled decay, zero gradient
    torch.testing.assert_close(model.linear.weight.detach(), expected)
    assert not torch.equal(model.linear.weight.detach(), weight_before)


# ------------------------------------------------------------------------------ param_groups


def test_param_groups_split_and_options():
    model = nn.Sequential(nn.Linear(2, 2), TopKGate((3,)), nn.Linear(2, 1))
    model[2].bias.requires_grad_(False)
    groups = param_groups(model, lr=1e-3, weight_decay=0.01, gate_lr=0.5)
    assert [g["name"] for g in groups] == ["base", "gates"]
    base, gates = groups
    assert {id(p) for p in base["params"]} == {
        id(model[0].weight), id(model[0].bias), id(model[2].weight)}
    assert [id(p) for p in gates["params"]] == [id(model[1].log_alpha)]
    assert (base["lr"], base["weight_decay"]) == (1e-3, 0.01)
    assert (gates["lr"], gates["weight_decay"]) == (0.5, 0.0)
    # gate_lr None -> lr; empty groups omitted; fixed gates own no parameters
    only_gate = param_groups(HardConcreteGate((2,)), lr=0.2, weight_decay=0.1)
    assert len(only_gate) == 1 and only_gate[0]["name"] == "gates" and only_gate[0]["lr"] == 0.2
    no_gate = param_groups(nn.Sequential(nn.Linear(2, 2), FixedGate.random((4,), keep=2)),
                           lr=0.2, weight_decay=0.1)
    assert [g["name"] for g in no_gate] == ["base"]
    with pytest.raises(ValueError, match="gate_lr must be >= 0; got -1"):
        param_groups(model, lr=0.1, weight_decay=0.0, gate_lr=-1)


# ------------------------------------------------------------------------------ every kind


@pytest.mark.parametrize("name", ALL_KINDS)
def test_forward_shapes_ranges_and_sparsity(name):
    gate = _build(name)
    z = gate()
    assert z.shape == (3, 4) and torch.all((z >= 0) & (z <= 1))
    assert gate.numel == 12
    l0, ratio = gate.expected_l0(), gate.keep_ratio()
    assert l0.shape == () and 0 <= l0.item() <= 12
    assert ratio.item() == pytest.approx(l0.item() / 12)
    assert gate.sparsity().item() == pytest.approx(1 - ratio.item())


@pytest.mark.parametrize("name", ALL_KINDS)
@pytest.mark.parametrize("k", [0, 1, 5, 12])
def test_eval_k_keeps_exactly_k_top_log_alpha(name, k):
    gate = _build(name)
    gate.eval()
    gate.eval_k = k
    z = gate()
    assert z.dtype == torch.float32 and set(z.unique().tolist()) <= {0.0, 1.0}
    assert int(z.sum()) == k
    expected = F.topk_mask(gate.log_alpha.detach(), k).float()
    assert torch.equal(z, expected)
    assert torch.equal(gate.deterministic_mask(k), expected)
    gate.train()
    assert gate.eval_k == k  # only eval uses it


@pytest.mark.parametrize("name", ALL_KINDS)
def test_deepcopy_and_state_dict_round_trip(name):
    gate = _build(name)
    clone = copy.deepcopy(gate)
    fresh = make_gate(name, (3, 4))
    fresh.load_state_dict(gate.state_dict())
    for other in (clone, fresh):
        assert gate.state_dict().keys() == other.state_dict().keys()
        for key, value in gate.state_dict().items():
            assert torch.equal(value, other.state_dict()[key]), key
        torch.manual_seed(7)
        a = gate()
        torch.manual_seed(7)
        assert torch.equal(a, other())  # same training sample under the same seed
        for g in (gate, other):
            g.eval()
        assert torch.equal(gate(), other())
        assert torch.equal(gate.expected_l0(), other.expected_l0())
        for g in (gate, other):
            g.train()


# ------------------------------------------------------------------------------ hard concrete


def test_hard_concrete_init_keep_ratio():
    for ratio in (0.1, 0.5, 0.9, 1.0):
        gate = HardConcreteGate((5,), init_keep_ratio=ratio)
        assert gate.keep_ratio().item() == pytest.approx(min(ratio, 1 - 1e-6), abs=1e-6)
    gate = HardConcreteGate((2,), temperature=0.3, stretch=(-0.2, 1.3), init_keep_ratio=0.4)
    assert F.prob_nonzero(gate.log_alpha, temperature=0.3, stretch=(-0.2, 1.3)).tolist() == (
        pytest.approx([0.4, 0.4], abs=1e-6))


def test_hard_concrete_train_sample_differentiable_eval_deterministic():
    gate = HardConcreteGate((1000,), init_log_alpha=0.0)
    z = gate.sample(generator=_gen(0))
    assert torch.equal(z, F.hard_concrete_sample(torch.zeros(1000), generator=_gen(0)))
    z.sum().backward()
    assert gate.log_alpha.grad.abs().sum() > 0
    gate.eval()
    assert torch.equal(gate(), torch.full((1000,), 0.5))


# ------------------------------------------------------------------------------ top-k


def test_topk_gate_forward_k_and_identity_gradient():
    torch.manual_seed(0)
    gate = TopKGate((3, 4), k=5)
    z = gate()
    assert int(z.sum()) == 5 and torch.equal(z, F.topk_mask(gate.log_alpha, 5).float())
    upstream = torch.randn(3, 4, generator=_gen(1))
    (z * upstream).sum().backward()
    assert torch.equal(gate.log_alpha.grad, upstream)
    l0 = gate.expected_l0()
    assert l0.item() == 5.0 and not l0.requires_grad and l0.dtype == torch.float32
    gate.k = 2  # a schedule moves k
    assert int(gate().sum()) == 2 and gate.keep_ratio().item() == pytest.approx(2 / 12)
    gate.k = None
    assert torch.equal(gate(), torch.ones(3, 4)) and gate.expected_l0().item() == 12.0
    gate.eval()
    gate.k = 3
    assert int(gate().sum()) == 3
    with pytest.raises(ValueError, match=r"k must be None or an int in \[0, numel\].*got 13"):
        gate.k = 13


def test_topk_gate_init_noise_breaks_ties():
    torch.manual_seed(0)
    a = TopKGate((100,), k=10)
    torch.manual_seed(0)
    b = TopKGate((100,), k=10)
    assert torch.equal(a.log_alpha, b.log_alpha)  # seeded by torch
    assert a.log_alpha.unique().numel() == 100  # no ties
    assert a.log_alpha.abs().max() < 0.01 and a.log_alpha.std() > 1e-4  # small noise around 0
    kept = torch.nonzero(a()).flatten()
    assert not torch.equal(kept, torch.arange(10))  # ties did not all go to the lowest indices
    assert TopKGate((10,), init_keep_ratio=0.25).k == 2  # round(2.5) -> 2
    assert TopKGate((10,), init_keep_ratio=0.01).k == 1
    quiet = TopKGate((4,), init_log_alpha=2.0, init_noise_std=0.0)
    assert torch.equal(quiet.log_alpha.detach(), torch.full((4,), 2.0))


# ------------------------------------------------------------------------------ threshold


def test_threshold_gate_forward_gradient_and_l0():
    init = torch.tensor([-2.0, -0.1, 0.0, 0.1, 3.0])
    gate = ThresholdGate((5,), threshold=0.5, init_log_alpha=init)
    z = gate()
    assert z.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    upstream = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.0])
    (z * upstream).sum().backward()
    s = torch.sigmoid(gate.log_alpha.detach())
    torch.testing.assert_close(gate.log_alpha.grad, upstream * s * (1 - s))
    gate.log_alpha.grad = None
    l0 = gate.expected_l0()
    assert l0.item() == 2.0
    l0.backward()
    torch.testing.assert_close(gate.log_alpha.grad, s * (1 - s))  # d Σ sigmoid
    gate.eval()
    assert gate().tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]


def test_threshold_gate_init_keep_ratio():
    torch.manual_seed(0)
    assert ThresholdGate((10,)).expected_l0().item() == 10.0  # default: all open
    for ratio, kept in ((0.3, 3), (0.01, 1), (1.0, 10)):
        gate = ThresholdGate((10,), threshold=0.7, init_keep_ratio=ratio, generator=_gen(0))
        assert int(gate().sum()) == kept and gate.expected_l0().item() == kept
    assert not torch.equal(
        ThresholdGate((10,), init_keep_ratio=0.3, generator=_gen(0))(),
        torch.tensor([1.0] * 3 + [0.0] * 7))  # random units, not the first ones


# ------------------------------------------------------------------------------ Gumbel-sigmoid


def test_gumbel_sigmoid_gate():
    gate = GumbelSigmoidGate((4,), init_log_alpha=torch.tensor([-1.0, -0.01, 0.01, 2.0]))
    z = gate.sample(generator=_gen(0))
    assert torch.all((z > 0) & (z < 1))
    sig = torch.sigmoid(gate.log_alpha.detach())
    torch.testing.assert_close(gate.expected_l0(), sig.sum())
    gate.expected_l0().backward()
    torch.testing.assert_close(gate.log_alpha.grad, sig * (1 - sig))
    gate.eval()
    assert gate().tolist() == [0.0, 0.0, 1.0, 1.0]
    hard = GumbelSigmoidGate((4,), hard=True)
    assert set(hard().unique().tolist()) <= {0.0, 1.0}
    ratio = GumbelSigmoidGate((3,), init_keep_ratio=0.2)
    assert ratio.keep_ratio().item() == pytest.approx(0.2, abs=1e-6)
    assert GumbelSigmoidGate((3,)).log_alpha.detach().tolist() == [3.0, 3.0, 3.0]


# ------------------------------------------------------------------------------ fixed


def test_fixed_gate_random_and_from_scores():
    gate = FixedGate.random((4, 5), keep=7, generator=_gen(0))
    assert list(gate.parameters()) == [] and int(gate().sum()) == 7
    assert torch.equal(gate.mask, FixedGate.random((4, 5), keep=7, generator=_gen(0)).mask)
    assert not torch.equal(gate.mask, FixedGate.random((4, 5), keep=7, generator=_gen(1)).mask)
    assert set(gate.log_alpha.unique().tolist()) == {-10.0, 10.0}
    assert torch.equal(gate.deterministic_mask(7), gate.mask)  # top-k agrees with the mask
    gate.eval()
    assert torch.equal(gate(), gate.mask) and gate.expected_l0().item() == 7.0
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.2, 0.9]])
    from_scores = FixedGate.from_scores(scores, keep=3)
    assert from_scores.mask.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]
    assert make_gate("fixed", (2, 3), scores=scores, keep=3).mask.tolist() == (
        from_scores.mask.tolist())
    explicit = FixedGate(torch.tensor([1, 0, 1]))
    assert explicit.mask.tolist() == [1.0, 0.0, 1.0] and explicit.shape == (3,)


def test_fixed_gate_errors():
    with pytest.raises(ValueError, match=r"must be 0/1 or bool; got values \[0.0, 0.5\]"):
        FixedGate(torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match=r"k=9 is outside \[0, numel\] = \[0, 4\]"):
        FixedGate.random((4,), keep=9)
    with pytest.raises(ValueError, match=r"mask/scores have shape \(3,\); expected \(4,\)"):
        make_gate("fixed", (4,), mask=torch.ones(3))
    assert math.isclose(make_gate("fixed", (4,)).keep_ratio().item(), 1.0)

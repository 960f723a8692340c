"""Gate protocol additions: per-unit keep probabilities, temperature annealing, and the
distributional checks of the gate modules (not only of the functional math)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from learnmask import functional as F
from learnmask.gates import (
    Gate,
    GumbelSigmoidGate,
    HardConcreteGate,
    TemperatureAnnealer,
    make_gate,
    register_gate,
    temperature_at,
)
from learnmask.gates import base as gate_base

KINDS = ["fixed", "gumbel_sigmoid", "hard_concrete", "threshold", "topk"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _gate(name: str, shape=(3, 4)) -> Gate:
    if name == "fixed":
        return make_gate("fixed", shape, keep=5, generator=_gen(1))
    gate = make_gate(name, shape, **({"k": 7} if name == "topk" else {}))
    with torch.no_grad():
        gate.log_alpha.copy_(torch.randn(shape, generator=_gen(2)) * 3)
    return gate


@pytest.mark.parametrize("name", KINDS)
def test_keep_probabilities_sum_to_expected_l0(name):
    gate = _gate(name)
    probs = gate.keep_probabilities()
    assert probs.shape == (3, 4) and torch.all((probs >= 0) & (probs <= 1))
    torch.testing.assert_close(probs.sum(), gate.expected_l0().to(probs.dtype))


def test_keep_probabilities_values_and_gradients():
    hc = _gate("hard_concrete")
    torch.testing.assert_close(hc.keep_probabilities(), F.prob_nonzero(hc.log_alpha))
    hc.keep_probabilities()[0, 0].backward()
    p = F.prob_nonzero(hc.log_alpha.detach()[0, 0])
    assert hc.log_alpha.grad[0, 0].item() == pytest.approx((p * (1 - p)).item(), rel=1e-5)
    assert hc.log_alpha.grad[1:].abs().sum() == 0  # one unit's probability depends on it alone
    gs = _gate("gumbel_sigmoid")
    torch.testing.assert_close(gs.keep_probabilities(), torch.sigmoid(gs.log_alpha))
    top = _gate("topk")
    assert torch.equal(top.keep_probabilities(), F.topk_mask(top.log_alpha, 7).float())


def test_default_keep_probabilities_spread_expected_l0(monkeypatch):
    monkeypatch.setattr(gate_base, "_GATE_REGISTRY", dict(gate_base._GATE_REGISTRY))  # no leak

    @register_gate("test_only_uniform")
    class Uniform(Gate):
        def sample(self, *, generator=None):
            return torch.sigmoid(self.log_alpha)

        def _eval_mask(self):
            return torch.sigmoid(self.log_alpha)

        def expected_l0(self):
            return torch.sigmoid(self.log_alpha).sum()

    gate = make_gate("test_only_uniform", (2, 2), init_log_alpha=torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
    probs = gate.keep_probabilities()
    torch.testing.assert_close(probs, torch.full((2, 2), gate.expected_l0().item() / 4))
    probs.sum().backward()
    s = torch.sigmoid(gate.log_alpha.detach())
    torch.testing.assert_close(gate.log_alpha.grad, s * (1 - s))


# ------------------------------------------------------------------------------ distribution


@pytest.mark.parametrize("temperature,stretch,log_alpha", [(0.3, (-0.2, 1.3), 0.4), (1.0, (-0.05, 1.05), -0.5)])
def test_gate_samples_follow_the_configured_distribution(temperature, stretch, log_alpha):
    n = 40_000
    gate = HardConcreteGate((n,), temperature=temperature, stretch=stretch, init_log_alpha=log_alpha)
    z = gate.sample(generator=_gen(3)).detach().double()
    la = torch.tensor(log_alpha, dtype=torch.float64)
    cdf = lambda x: F.hard_concrete_cdf(  # noqa: E731
        torch.as_tensor(x, dtype=torch.float64), la, temperature=temperature, stretch=stretch).numpy()
    p0, p1 = float(cdf(0.0)), 1.0 - float(cdf(math.nextafter(1.0, 0.0)))
    for observed, expected in (((z == 0).double().mean().item(), p0), ((z == 1).double().mean().item(), p1)):
        assert abs(observed - expected) < 4 * math.sqrt(expected * (1 - expected) / n)
    inside = z[(z > 0) & (z < 1)].numpy()
    assert stats.kstest(inside, lambda x: (cdf(x) - p0) / (1 - p1 - p0)).pvalue > 1e-3
    # Monte Carlo of E[#nonzero] against the gate's expected_l0 (4 standard errors)
    p = gate.expected_l0().item() / n
    assert abs((z > 0).double().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)


@settings(max_examples=60, deadline=None)
@given(ratio=st.floats(0.01, 0.999), beta=st.floats(0.1, 2.0), gamma=st.floats(-0.5, -0.01),
       zeta=st.floats(1.01, 1.5))
def test_init_keep_ratio_is_inverted_exactly(ratio, beta, gamma, zeta):
    gate = HardConcreteGate((3,), temperature=beta, stretch=(gamma, zeta), init_keep_ratio=ratio)
    probs = F.prob_nonzero(gate.log_alpha.double(), temperature=beta, stretch=(gamma, zeta))
    assert torch.allclose(probs, torch.full((3,), ratio, dtype=torch.float64), atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(-30, 30), min_size=2, max_size=20))
def test_deterministic_gate_is_monotone_and_in_range(values):
    la = torch.tensor(sorted(values), dtype=torch.float64)
    gate = F.deterministic_gate(la)
    assert torch.all((gate >= 0) & (gate <= 1)) and torch.all(gate[1:] >= gate[:-1])
    assert torch.all(F.prob_nonzero(la)[1:] >= F.prob_nonzero(la)[:-1])


# ------------------------------------------------------------------------------ annealing


def test_temperature_schedules_values():
    kw = dict(start=2.0, end=0.5, steps=4)
    assert [temperature_at(s, kind="exponential", **kw) for s in range(6)] == pytest.approx(
        [2.0, 2.0 * 0.25 ** 0.25, 1.0, 2.0 * 0.25 ** 0.75, 0.5, 0.5])
    assert [temperature_at(s, kind="linear", **kw) for s in (0, 2, 4, 9)] == pytest.approx([2.0, 1.25, 0.5, 0.5])
    assert [temperature_at(s, kind="cosine", **kw) for s in (0, 2, 4)] == pytest.approx([2.0, 1.25, 0.5])
    assert temperature_at(3, kind="constant", **kw) == 2.0


@pytest.mark.parametrize("bad, message", [
    (dict(start=0.0), "temperature must be a finite number > 0"),
    (dict(steps=0), "steps must be an int >= 1; got 0"),
    (dict(step=-1), "step must be an int >= 0; got -1"),
    (dict(kind="cubic"), "unknown annealing schedule 'cubic'; known: exponential, linear, cosine, constant"),
])
def test_temperature_schedule_errors(bad, message):
    options = dict(step=0, start=1.0, end=0.5, steps=3, kind="linear") | bad
    step = options.pop("step")
    with pytest.raises(ValueError, match=message):
        temperature_at(step, **options)


def test_annealer_sets_gate_temperatures_and_resumes():
    hc, gs = HardConcreteGate((4,)), GumbelSigmoidGate((4,))
    annealer = TemperatureAnnealer([hc, gs], start=1.0, end=0.25, steps=2)
    assert hc.temperature == gs.temperature == 1.0
    annealer.step()
    assert hc.temperature == pytest.approx(0.5) and gs.temperature == pytest.approx(0.5)
    # the sample uses the new temperature: same noise, lower β -> the value of the functional form
    z = hc.sample(generator=_gen(0))
    assert torch.equal(z, F.hard_concrete_sample(hc.log_alpha, temperature=0.5, generator=_gen(0)))
    resumed = TemperatureAnnealer([HardConcreteGate((4,))], start=1.0, end=0.25, steps=2)
    resumed.load_state_dict(annealer.state_dict())
    assert resumed.gates[0].temperature == pytest.approx(0.5)
    annealer.step(), annealer.step()
    assert hc.temperature == pytest.approx(0.25)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0; got 0"):
        hc.temperature = 0
    with pytest.raises(ValueError, match="FixedGate has no temperature to anneal"):
        TemperatureAnnealer([make_gate("fixed", (2,))], start=1.0, end=0.5, steps=2)


def test_deepcopy_keeps_temperature():
    gate = HardConcreteGate((5,), temperature=0.4)
    clone = copy.deepcopy(gate)
    assert clone.temperature == 0.4
    torch.manual_seed(1)
    a = gate()
    torch.manual_seed(1)
    assert torch.equal(a, clone())

"""Tests for learnmask.control: schedules, the Lagrangian controller (case C1), FixedPenalty."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from control_plant import t64, toy_plant
from hypothesis import given, settings
from hypothesis import strategies as st

from learnmask.control import (
    ConstantTarget,
    CubicWarmup,
    FixedPenalty,
    LagrangianController,
    LinearWarmup,
    lagrangian_penalty,
    make_schedule,
)

# --------------------------------------------------------------------------------------
# Case C1: the sign of the Lagrangian
# --------------------------------------------------------------------------------------


def test_c1_penalty_value_and_multiplier_gradients():
    """penalty(s=0.3, t=0.5, λ1=λ2=0) = 0; ∂/∂λ1 = s - t = -0.2; ∂/∂λ2 = (s - t)² = 0.04."""
    lambda_1, lambda_2 = t64(0.0, True), t64(0.0, True)
    pen = lagrangian_penalty(t64(0.3), 0.5, lambda_1, lambda_2)
    assert pen.dim() == 0
    assert pen.item() == 0.0
    grad_1, grad_2 = torch.autograd.grad(pen, (lambda_1, lambda_2))
    assert grad_1.item() == pytest.approx(-0.2, abs=1e-12)
    assert grad_2.item() == pytest.approx(0.04, abs=1e-12)


def test_lagrangian_penalty_differentiable_in_sparsity_and_target():
    s, t = t64(0.3, True), t64(0.5, True)
    pen = lagrangian_penalty(s, t, t64(0.1), t64(0.2))
    # 0.1 * (-0.2) + 0.2 * 0.04
    assert pen.item() == pytest.approx(-0.012, abs=1e-12)
    grad_s, grad_t = torch.autograd.grad(pen, (s, t))
    # d/ds = λ1 + 2 λ2 (s - t) = 0.1 - 0.08
    assert grad_s.item() == pytest.approx(0.02, abs=1e-12)
    assert grad_t.item() == pytest.approx(-0.02, abs=1e-12)


def test_c1_one_ascent_step_has_the_ascent_sign():
    ctl = LagrangianController(0.5, lr=1.0, damping=0.0)
    s = t64(0.3, True)
    pen = ctl.penalty(s)
    assert pen.item() == 0.0
    ctl.step()
    assert ctl.lambda_1 == pytest.approx(-0.2, abs=1e-12)
    assert ctl.lambda_2 == pytest.approx(0.04, abs=1e-12)
    assert ctl.step_count == 1
    # A descent step (λ -= lr ∂penalty/∂λ) would give λ1 = +0.2, λ2 = -0.04: the wrong sign.
    descent_lambda_1 = 0.0 - 1.0 * (0.3 - 0.5)
    assert descent_lambda_1 == pytest.approx(0.2)
    assert ctl.lambda_1 < 0.0 < descent_lambda_1
    assert ctl.lambda_2 > 0.0
    # With the ascended multipliers the penalty pushes a too-dense model toward sparsity:
    # d penalty / d s < 0, so gradient descent on the model raises s.
    s = t64(0.3, True)
    ctl.penalty(s).backward()
    # λ1 + 2 λ2 (s - t) = -0.2 + 2 * 0.04 * (-0.2)
    assert s.grad.item() == pytest.approx(-0.216, abs=1e-12)


def test_penalty_with_damping_and_gradient_to_s_only():
    ctl = LagrangianController(0.5, lr=1.0, lambda_1=0.1, lambda_2=0.2, damping=1.0)
    s = t64(0.3, True)
    pen = ctl.penalty(s)
    # 0.1 * (-0.2) + (0.2 + 1/2) * 0.04
    assert pen.item() == pytest.approx(0.008, abs=1e-12)
    pen.backward()
    # λ1 + (2 λ2 + c)(s - t) = 0.1 + 1.4 * (-0.2)
    assert s.grad.item() == pytest.approx(-0.18, abs=1e-12)
    metrics = ctl.last_metrics()
    assert metrics == pytest.approx(
        {"target": 0.5, "sparsity": 0.3, "lambda_1": 0.1, "lambda_2": 0.2, "penalty": 0.008}
    )


def test_default_damping_changes_c1_value_only_by_damping_term():
    ctl = LagrangianController(0.5)  # default damping
    pen = ctl.penalty(t64(0.3))
    assert pen.item() == pytest.approx(0.5 * ctl.damping * 0.04, abs=1e-12)


@settings(max_examples=50, deadline=None)
@given(
    s=st.floats(0.0, 1.0),
    t=st.floats(0.0, 0.99),
    lr=st.floats(1e-4, 10.0),
    lambda_1=st.floats(-5.0, 5.0),
)
def test_dual_ascent_sign_property(s, t, lr, lambda_1):
    ctl = LagrangianController(t, lr=lr, lambda_1=lambda_1, damping=0.0)
    ctl.penalty(t64(s))
    ctl.step()
    assert ctl.lambda_1 - lambda_1 == pytest.approx(lr * (s - t), rel=1e-9, abs=1e-12)
    assert ctl.lambda_2 == pytest.approx(lr * (s - t) ** 2, rel=1e-9, abs=1e-12)
    assert ctl.lambda_2 >= 0.0


# --------------------------------------------------------------------------------------
# Case C1: toy plant s = sigmoid(θ), s0 = 0.1, target 0.5
# --------------------------------------------------------------------------------------

TARGET = 0.5
TOL = 0.01


def run_plant(ctl, optimizer: str, lr: float, steps: int) -> list[float]:
    """Close the loop on s = sigmoid(θ) from s = 0.1; return the gaps s - t per step."""
    sparsity, target = toy_plant(ctl, optimizer, lr, steps)
    return [s - t for s, t in zip(sparsity, target)]


def settle_step(gaps: list[float], tol: float = TOL) -> int | None:
    """First step from which |gap| < tol holds to the end; None if it never settles."""
    for i in range(len(gaps) - 1, -1, -1):
        if abs(gaps[i]) >= tol:
            return i + 1 if i + 1 < len(gaps) else None
    return 0


def overshoot(gaps: list[float]) -> float:
    """max(s - t) after s first reaches t (the plant starts below target)."""
    first = next((i for i, g in enumerate(gaps) if g >= 0.0), None)
    assert first is not None, "s never reached the target"
    return max(gaps[first:])


def half_cycle_peaks(gaps: list[float]) -> list[float]:
    """Peak |s - t| in each run of constant sign of s - t."""
    peaks, current, positive = [], abs(gaps[0]), gaps[0] >= 0
    for g in gaps[1:]:
        if (g >= 0) != positive:
            peaks.append(current)
            current, positive = abs(g), g >= 0
        else:
            current = max(current, abs(g))
    peaks.append(current)
    return peaks


def window_peaks(gaps: list[float], window: int) -> list[float]:
    return [max(abs(g) for g in gaps[i : i + window]) for i in range(0, len(gaps), window)]


def assert_decaying(gaps: list[float], window: int) -> None:
    halves = half_cycle_peaks(gaps)
    assert all(b < a for a, b in zip(halves, halves[1:])), halves
    windows = window_peaks(gaps, window)
    assert all(b <= a for a, b in zip(windows, windows[1:])), windows
    assert windows[-1] < 0.1 * windows[0], windows


def test_toy_plant_sgd_default_controller():
    """Plain SGD on θ with lr 1.0 (measured: settles at step 7, overshoot 0.0015)."""
    gaps = run_plant(LagrangianController(TARGET), "sgd", lr=1.0, steps=1000)
    settled = settle_step(gaps)
    assert settled is not None and settled <= 20, settled
    assert max(abs(g) for g in gaps[-100:]) < TOL
    assert overshoot(gaps) <= 0.05
    assert_decaying(gaps, window=50)


def test_toy_plant_slower_sgd_still_meets_c1():
    """SGD lr 0.1 (10x slower plant): measured settle step 337, overshoot 0.012."""
    gaps = run_plant(LagrangianController(TARGET), "sgd", lr=0.1, steps=1500)
    settled = settle_step(gaps)
    assert settled is not None and settled <= 600, settled
    assert overshoot(gaps) <= 0.05
    assert_decaying(gaps, window=100)


def test_toy_plant_adam_default_controller():
    """Adam on θ (lr 0.05), as for real gate logits: measured settle 131, overshoot 0.042."""
    gaps = run_plant(LagrangianController(TARGET), "adam", lr=0.05, steps=2000)
    settled = settle_step(gaps)
    assert settled is not None and settled < 2000, settled
    assert settled <= 300, settled
    assert max(abs(g) for g in gaps[-100:]) < TOL
    assert overshoot(gaps) <= 0.05
    assert_decaying(gaps, window=100)


@pytest.mark.parametrize("optimizer, lr", [("sgd", 1.0), ("adam", 0.05)])
def test_toy_plant_undamped_overshoots(optimizer, lr):
    """Why damping is the default: the plain method overshoots C1's 0.05 bound (~0.34)."""
    ctl = LagrangianController(TARGET, damping=0.0)
    gaps = run_plant(ctl, optimizer, lr=lr, steps=400)
    assert overshoot(gaps) > 0.2


# --------------------------------------------------------------------------------------
# Controller: errors, NaN, state
# --------------------------------------------------------------------------------------


def test_step_without_penalty_raises():
    ctl = LagrangianController(0.5)
    with pytest.raises(RuntimeError, match=r"penalty\(s\) first"):
        ctl.step()
    ctl.penalty(t64(0.3))
    ctl.step()
    with pytest.raises(RuntimeError, match=r"penalty\(s\) first"):
        ctl.step()  # the recorded s is consumed by one step
    assert ctl.step_count == 1


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_sparsity_never_corrupts_state(bad, caplog):
    ctl = LagrangianController(0.5, lr=1.0, lambda_1=-0.3, lambda_2=0.2)
    s = torch.tensor(bad, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="learnmask.control.lagrangian"):
        pen = ctl.penalty(s)
        ctl.step()
    assert pen.shape == () and pen.item() == 0.0 and pen.dtype == s.dtype
    assert ctl.lambda_1 == -0.3 and ctl.lambda_2 == 0.2
    assert ctl.step_count == 1
    assert sum("non-finite sparsity" in r.getMessage() for r in caplog.records) == 2
    # Recovers on the next finite measurement.
    ctl.penalty(t64(0.4))
    ctl.step()
    assert ctl.lambda_1 == pytest.approx(-0.4)
    assert ctl.step_count == 2


def test_penalty_rejects_bad_shapes_and_ranges():
    ctl = LagrangianController(0.5)
    with pytest.raises(ValueError, match=r"0-dim tensor.*got shape \(3,\)"):
        ctl.penalty(torch.zeros(3))
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\].*got 1.5"):
        ctl.penalty(torch.tensor(1.5))
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\]"):
        FixedPenalty(1.0).penalty(torch.tensor(-0.5))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": 0.0}, r"lr must be > 0; got 0.0"),
        ({"lr": -1.0}, r"lr must be > 0"),
        ({"damping": -1.0}, r"damping must be >= 0.0; got -1.0"),
        ({"lambda_2": -0.1}, r"lambda_2 must be >= 0.0"),
        ({"lambda_1": math.nan}, r"lambda_1 must be finite"),
    ],
)
def test_controller_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LagrangianController(0.5, **kwargs)


def test_controller_rejects_bad_targets():
    with pytest.raises(ValueError, match=r"target sparsity must be in \[0, 1\); got 1.2"):
        LagrangianController(1.2)
    with pytest.raises(ValueError, match=r"target sparsity must be in \[0, 1\); got 2.0"):
        LagrangianController(lambda step: 2.0)  # checked at construction, step 0
    with pytest.raises(TypeError, match=r"target must be a float in \[0, 1\) or a schedule"):
        LagrangianController("0.5")


def test_controller_follows_schedule():
    ctl = LagrangianController(LinearWarmup(0.5, warmup_steps=10), lr=1.0, damping=0.0)
    assert ctl.target == 0.0
    for _ in range(5):
        ctl.penalty(t64(0.0))
        ctl.step()
    assert ctl.target == pytest.approx(0.25)
    # Targets used were 0, 0.05, ..., 0.2 with s = 0: λ1 = -(0 + .05 + .1 + .15 + .2).
    assert ctl.lambda_1 == pytest.approx(-0.5)
    for _ in range(20):
        ctl.penalty(t64(0.5))
        ctl.step()
    assert ctl.target == 0.5


def test_state_dict_round_trip_is_exact():
    ctl = LagrangianController(CubicWarmup(0.6, 7), lr=0.37)
    for s in (0.1, 0.25, 0.33, 0.61):
        ctl.penalty(t64(s))
        ctl.step()
    state = ctl.state_dict()
    assert set(state) == {"lambda_1", "lambda_2", "step_count"}
    assert type(state["lambda_1"]) is float and type(state["lambda_2"]) is float
    assert type(state["step_count"]) is int and state["step_count"] == 4
    clone = LagrangianController(CubicWarmup(0.6, 7), lr=0.37)
    clone.load_state_dict(dict(state))
    assert clone.state_dict() == state
    assert clone.target == ctl.target
    s = t64(0.42)
    assert torch.equal(clone.penalty(s), ctl.penalty(s))
    clone.step()
    ctl.step()
    assert clone.state_dict() == ctl.state_dict()


def test_load_state_dict_rejects_missing_unknown_and_bad_values():
    ctl = LagrangianController(0.5)
    with pytest.raises(ValueError, match=r"missing keys \['step_count'\], unknown keys \[\]"):
        ctl.load_state_dict({"lambda_1": 0.0, "lambda_2": 0.0})
    with pytest.raises(ValueError, match=r"unknown keys \['lamda_1'\]"):
        ctl.load_state_dict({"lambda_1": 0.0, "lambda_2": 0.0, "step_count": 0, "lamda_1": 1.0})
    with pytest.raises(ValueError, match=r"lambda_2 must be >= 0.0"):
        ctl.load_state_dict({"lambda_1": 0.0, "lambda_2": -1.0, "step_count": 0})
    with pytest.raises(TypeError, match=r"step_count must be an int"):
        ctl.load_state_dict({"lambda_1": 0.0, "lambda_2": 0.0, "step_count": 1.5})
    assert ctl.state_dict() == {"lambda_1": 0.0, "lambda_2": 0.0, "step_count": 0}


def test_last_metrics_before_and_after_penalty():
    ctl = LagrangianController(0.5, lr=1.0, damping=0.0)
    metrics = ctl.last_metrics()
    assert set(metrics) == {"target", "sparsity", "lambda_1", "lambda_2", "penalty"}
    assert math.isnan(metrics["sparsity"]) and math.isnan(metrics["penalty"])
    ctl.penalty(t64(0.3))
    ctl.step()
    metrics = ctl.last_metrics()
    assert metrics["sparsity"] == pytest.approx(0.3)
    assert metrics["penalty"] == 0.0  # computed with the multipliers before the step
    assert metrics["lambda_1"] == pytest.approx(-0.2)


# --------------------------------------------------------------------------------------
# FixedPenalty
# --------------------------------------------------------------------------------------


def test_fixed_penalty_values():
    fixed = FixedPenalty(0.5)
    s = t64(0.3, True)
    pen = fixed.penalty(s)
    assert pen.item() == pytest.approx(0.35, abs=1e-12)  # 0.5 * (1 - 0.3)
    pen.backward()
    assert s.grad.item() == pytest.approx(-0.5, abs=1e-12)  # always pushes s up
    assert fixed.last_metrics() == pytest.approx(
        {"weight": 0.5, "sparsity": 0.3, "penalty": 0.35}
    )
    assert FixedPenalty(0.0).penalty(t64(0.3)).item() == 0.0
    assert FixedPenalty(2.0).penalty(t64(1.0)).item() == 0.0


def test_fixed_penalty_step_and_state():
    fixed = FixedPenalty(0.5)
    fixed.step()
    fixed.step()
    assert fixed.step_count == 2 and fixed.weight == 0.5
    state = fixed.state_dict()
    assert state == {"step_count": 2}
    other = FixedPenalty(0.5)
    other.load_state_dict(state)
    assert other.state_dict() == state
    with pytest.raises(ValueError, match=r"missing keys \['step_count'\]"):
        other.load_state_dict({})
    with pytest.raises(ValueError, match=r"unknown keys \['weight'\]"):
        other.load_state_dict({"step_count": 1, "weight": 0.5})


def test_fixed_penalty_bad_weight_and_nan(caplog):
    with pytest.raises(ValueError, match=r"weight must be >= 0.0; got -1.0"):
        FixedPenalty(-1.0)
    with caplog.at_level(logging.WARNING, logger="learnmask.control.lagrangian"):
        pen = FixedPenalty(0.5).penalty(torch.tensor(math.nan))
    assert pen.item() == 0.0
    assert any("non-finite sparsity" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------


def test_constant_target():
    schedule = ConstantTarget(0.3)
    assert schedule(0) == 0.3 and schedule(10**6) == 0.3


def test_linear_warmup_values():
    schedule = LinearWarmup(0.6, warmup_steps=100)
    assert schedule(0) == 0.0
    assert schedule(50) == pytest.approx(0.3)  # half the warm-up -> half the final
    assert schedule(25) == pytest.approx(0.15)
    assert schedule(100) == 0.6
    assert schedule(5000) == 0.6
    ramp_from = LinearWarmup(0.6, warmup_steps=100, initial=0.2)
    assert ramp_from(0) == pytest.approx(0.2)
    assert ramp_from(50) == pytest.approx(0.4)


def test_cubic_warmup_values():
    schedule = CubicWarmup(0.8, warmup_steps=100)
    assert schedule(0) == pytest.approx(0.0)
    # final + (initial - final) (1 - step / warmup)^3
    assert schedule(50) == pytest.approx(0.8 - 0.8 * 0.5**3)  # 0.7
    assert schedule(25) == pytest.approx(0.8 - 0.8 * 0.75**3)  # 0.4625
    assert schedule(100) == 0.8
    assert schedule(10**6) == 0.8
    ramp_from = CubicWarmup(0.8, warmup_steps=100, initial=0.2)
    assert ramp_from(0) == pytest.approx(0.2)
    assert ramp_from(50) == pytest.approx(0.8 - 0.6 * 0.125)
    # Cubic front-loads: ahead of the linear ramp everywhere inside the warm-up.
    linear = LinearWarmup(0.8, warmup_steps=100)
    assert all(schedule(k) > linear(k) for k in range(1, 100))


@pytest.mark.parametrize("cls", [LinearWarmup, CubicWarmup])
def test_zero_warmup_jumps_to_final(cls):
    schedule = cls(0.4, warmup_steps=0, initial=0.1)
    assert schedule(0) == 0.4 and schedule(3) == 0.4


@pytest.mark.parametrize("bad", [1.2, 1.0, -0.1, math.nan])
def test_bad_targets_raise(bad):
    pattern = r"target sparsity must be in \[0, 1\); got "
    with pytest.raises(ValueError, match=pattern):
        ConstantTarget(bad)
    with pytest.raises(ValueError, match=pattern):
        LinearWarmup(bad, 10)
    with pytest.raises(ValueError, match=pattern):
        CubicWarmup(0.5, 10, initial=bad)


def test_exact_target_error_message():
    with pytest.raises(ValueError, match=r"target sparsity must be in \[0, 1\); got 1.2"):
        make_schedule("linear", 1.2, 10)


def test_bad_warmup_and_step():
    with pytest.raises(ValueError, match=r"warmup_steps must be >= 0.*got -1"):
        LinearWarmup(0.5, -1)
    with pytest.raises(TypeError, match=r"warmup_steps must be an int"):
        CubicWarmup(0.5, 10.0)
    with pytest.raises(ValueError, match=r"step must be >= 0; got -1"):
        LinearWarmup(0.5, 10)(-1)


def test_make_schedule():
    assert make_schedule("constant", 0.5, 100) == ConstantTarget(0.5)
    assert make_schedule("linear", 0.5, 100, 0.1) == LinearWarmup(0.5, 100, 0.1)
    assert make_schedule("cubic", 0.5, 100) == CubicWarmup(0.5, 100, 0.0)
    with pytest.raises(ValueError, match=r"unknown schedule kind 'exp'.*constant, linear, cubic"):
        make_schedule("exp", 0.5, 100)
    with pytest.raises(ValueError, match=r"warmup_steps must be >= 0"):
        make_schedule("constant", 0.5, -5)


def test_schedules_are_frozen():
    schedule = LinearWarmup(0.5, 10)
    with pytest.raises(AttributeError):
        schedule.final = 0.9  # type: ignore[misc]

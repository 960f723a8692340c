"""Tests for PIDController / PIController, LossAdaptiveController and control_metrics."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from control_plant import F64, t64
from control_plant import toy_plant as run_plant

from learnmask.control import (
    LagrangianController,
    LossAdaptiveController,
    PIController,
    PIDController,
    control_metrics,
)

# --------------------------------------------------------------------------------------
# PIDController: sign, law, equivalence with dual ascent
# --------------------------------------------------------------------------------------


def test_c1_sign_pure_integral():
    ctl = PIDController(0.5, kp=0.0, ki=1.0, damping=0.0, integral_clip=None)
    assert ctl.penalty(t64(0.3)).item() == 0.0
    ctl.step()
    assert ctl.lambda_1 == pytest.approx(-0.2, abs=1e-12)
    s = t64(0.3, True)
    ctl.penalty(s).backward()
    assert s.grad.item() == pytest.approx(-0.2, abs=1e-12)  # descent on s raises s


def test_pid_law_by_hand():
    ctl = PIDController(0.5, kp=2.0, ki=0.5, kd=3.0, damping=1.0, ema=0.5, integral_clip=0.15)
    ctl.penalty(t64(0.3))  # e = -0.2, clipped to -0.15 for I; ξ = e (first), no D kick
    ctl.step()
    assert ctl.integral == pytest.approx(-0.075)
    assert ctl.error_ema == pytest.approx(-0.2)
    assert ctl.lambda_1 == pytest.approx(-0.075 + 2.0 * -0.2)
    m = ctl.last_metrics()
    assert m["p_term"] == pytest.approx(-0.4) and m["d_term"] == 0.0
    s = t64(0.4, True)
    pen = ctl.penalty(s)  # e = -0.1: λ e + (1/2) e²
    assert pen.item() == pytest.approx(-0.475 * -0.1 + 0.5 * 0.01)
    pen.backward()
    assert s.grad.item() == pytest.approx(-0.475 + 1.0 * -0.1)
    ctl.step()  # I = -0.075 - 0.05; ξ = 0.5 ξ + 0.5 e = -0.15; D = 3 (−0.15 + 0.2)
    assert ctl.integral == pytest.approx(-0.125)
    assert ctl.error_ema == pytest.approx(-0.15)
    assert ctl.lambda_1 == pytest.approx(-0.125 - 0.3 + 0.15)
    assert ctl.last_metrics()["d_term"] == pytest.approx(0.15)


@pytest.mark.parametrize("optimizer, lr", [("adam", 0.05), ("sgd", 1.0)])
def test_pure_integral_reproduces_lagrangian_exactly(optimizer, lr):
    pid = PIDController(0.5, kp=0.0, ki=0.01, kd=0.0, damping=10.0, integral_clip=None)
    lag = LagrangianController(0.5, lr=0.01, damping=10.0)
    thetas = [torch.tensor(-2.0, dtype=F64, requires_grad=True) for _ in range(2)]
    opt_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer]
    opts = [opt_cls([th], lr=lr) for th in thetas]
    for _ in range(50):
        pens = []
        for ctl, theta, opt in zip((pid, lag), thetas, opts):
            pen = ctl.penalty(torch.sigmoid(theta))
            pens.append(pen)
            opt.zero_grad()
            pen.backward()
            opt.step()
            ctl.step()
        lag.lambda_2 = 0.0  # hold λ2 at 0: the PID controller has no quadratic multiplier
        assert torch.equal(pens[0], pens[1])
        assert pid.lambda_1 == lag.lambda_1
        assert torch.equal(thetas[0], thetas[1])
    assert pid.lambda_1 != 0.0


def test_pi_controller_is_pid_with_kd_zero():
    pi = PIController(0.4, kp=1.5, ki=0.2)
    assert isinstance(pi, PIDController) and pi.kd == 0.0
    assert (pi.kp, pi.ki, pi.damping, pi.integral_clip) == (1.5, 0.2, 10.0, 0.01)
    with pytest.raises(TypeError):
        PIController(0.4, kd=1.0)  # type: ignore[call-arg]


# --------------------------------------------------------------------------------------
# Toy plant (case C1): PI vs Lagrangian
# --------------------------------------------------------------------------------------


def test_toy_plant_adam_pi_beats_lagrangian():
    """Adam lr 0.05. Measured: PI overshoot 0.0363, settles step 78; Lagrangian 0.0419, 131."""
    pi = control_metrics(*run_plant(PIController(0.5), "adam", 0.05))
    lag = control_metrics(*run_plant(LagrangianController(0.5), "adam", 0.05))
    assert pi["settled"] and pi["tail_max_error"] <= 0.01
    assert pi["overshoot"] < lag["overshoot"]
    assert pi["overshoot"] == pytest.approx(0.0363, abs=2e-3)
    assert lag["overshoot"] == pytest.approx(0.0419, abs=2e-3)
    assert pi["settling_step"] < lag["settling_step"]


def test_adam_overshoot_floor_without_derivative():
    """Why PI cannot reach 0.03 under Adam: the damping term alone (ki = kp = 0) already
    overshoots ~0.032, from Adam's momentum; a D term brakes before the crossing."""
    p_only = control_metrics(*run_plant(PIDController(0.5, kp=0.0, ki=0.0), "adam", 0.05))
    assert 0.03 < p_only["overshoot"] < 0.035
    pid = control_metrics(*run_plant(PIDController(0.5, kd=10.0), "adam", 0.05))
    assert pid["settled"] and pid["overshoot"] < 0.0315


@pytest.mark.parametrize("lr, max_overshoot", [(1.0, 0.002), (0.1, 0.01)])
def test_toy_plant_sgd_pi(lr, max_overshoot):
    """SGD lr 1.0: overshoot 0.0008 (Lagrangian 0.0015); lr 0.1: 0.0054 (Lagrangian 0.012)."""
    m = control_metrics(*run_plant(PIController(0.5), "sgd", lr))
    assert m["settled"] and m["overshoot"] <= max_overshoot
    assert m["settling_step"] <= 100


@pytest.mark.parametrize("optimizer, lr", [("adam", 0.05), ("sgd", 1.0)])
def test_opposing_task_gradient_needs_integral_action(optimizer, lr):
    """loss = -0.5 s + penalty: PI settles; proportional-only keeps e = -0.5 / (kp + c)."""
    pi = control_metrics(*run_plant(PIController(0.5), optimizer, lr, task=0.5))
    p_only = control_metrics(*run_plant(PIController(0.5, ki=0.0), optimizer, lr, task=0.5))
    assert pi["settled"] and pi["tail_max_error"] <= 0.01 and pi["final_error"] < 1e-3
    assert not p_only["settled"]
    assert p_only["final_error"] == pytest.approx(0.5 / (1.0 + 10.0), abs=1e-3)


# --------------------------------------------------------------------------------------
# PIDController: NaN, state, errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_pid_non_finite_sparsity(bad, caplog):
    ctl = PIDController(0.5, kp=1.0, ki=1.0, lambda_1=-0.3)
    ctl.penalty(t64(0.4))
    ctl.step()
    before = ctl.state_dict()
    s = torch.tensor(bad, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="learnmask.control.pid"):
        pen = ctl.penalty(s)
        ctl.step()
    assert pen.shape == () and pen.item() == 0.0
    after = ctl.state_dict()
    assert after == {**before, "step_count": 2}
    assert sum("non-finite sparsity" in r.getMessage() for r in caplog.records) == 2


def test_pid_state_round_trip_and_key_checks():
    ctl = PIDController(0.5, kd=2.0, ema=0.3)
    for s in (0.1, 0.3, 0.45, 0.52):
        ctl.penalty(t64(s))
        ctl.step()
    state = ctl.state_dict()
    assert set(state) == {"lambda_1", "integral", "error_ema", "step_count"}
    clone = PIDController(0.5, kd=2.0, ema=0.3)
    assert clone.state_dict()["error_ema"] is None
    clone.load_state_dict(dict(state))
    assert clone.state_dict() == state
    for c in (ctl, clone):
        c.penalty(t64(0.49))
        c.step()
    assert clone.state_dict() == ctl.state_dict()
    with pytest.raises(ValueError, match=r"missing keys \['error_ema'\]"):
        clone.load_state_dict({"lambda_1": 0.0, "integral": 0.0, "step_count": 0})
    with pytest.raises(ValueError, match=r"unknown keys \['lambda_2'\]"):
        clone.load_state_dict({**state, "lambda_2": 0.0})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kp": -1.0}, r"kp must be >= 0.0; got -1.0"),
        ({"ki": -0.1}, r"ki must be >= 0.0"),
        ({"ema": 1.0}, r"ema must be in \[0, 1\).*got 1.0"),
        ({"integral_clip": 0.0}, r"integral_clip must be > 0; got 0.0"),
    ],
)
def test_pid_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PIDController(0.5, **kwargs)


def test_pid_step_without_penalty_raises():
    with pytest.raises(RuntimeError, match=r"PIDController.step\(\).*penalty\(s\) first"):
        PIDController(0.5).step()


# --------------------------------------------------------------------------------------
# LossAdaptiveController
# --------------------------------------------------------------------------------------


def test_loss_adaptive_falling_loss_raises_ratio_to_r_max():
    ctl = LossAdaptiveController(0.15, r_max=0.2, max_step=0.02, ema=0.5)
    assert ctl.update(4.0) == 0.15  # first loss only sets the level
    assert ctl.level == 4.0
    expected = [0.17, 0.19, 0.2, 0.2]
    for loss, want in zip((3.0, 2.0, 1.0, 0.5), expected):
        assert ctl.update(loss) == pytest.approx(want, abs=1e-12)
    # level halves toward each loss: 3.5, 2.75, 1.875, 1.1875
    assert ctl.level == pytest.approx(1.1875)
    assert ctl.last_metrics()["delta"] == 0.0


def test_loss_adaptive_rising_loss_and_keep_ratio_direction():
    up = LossAdaptiveController(0.5, r_min=0.46, max_step=0.02, ema=0.9)
    up.update(1.0)
    assert [up.update(x) for x in (1.5, 2.0, 3.0)] == pytest.approx([0.48, 0.46, 0.46])
    keep = LossAdaptiveController(0.5, harder="down", max_step=0.1)
    keep.update(1.0)
    assert keep.update(0.9) == pytest.approx(0.4)  # easy: a smaller keep ratio is harder
    assert keep.update(5.0) == pytest.approx(0.5)
    tol = LossAdaptiveController(0.5, tolerance=0.1, max_step=0.1)
    tol.update(1.0)
    assert tol.update(1.05) == pytest.approx(0.6)  # within 10 % of the level: still easy


def test_loss_adaptive_nan_and_round_trip(caplog):
    ctl = LossAdaptiveController(0.3, max_step=0.05)
    ctl.update(2.0)
    ctl.update(1.0)
    before = ctl.state_dict()
    with caplog.at_level(logging.WARNING, logger="learnmask.control.loss_adaptive"):
        assert ctl.update(math.nan) == pytest.approx(0.35)
    assert ctl.state_dict() == before
    assert any("non-finite loss" in r.getMessage() for r in caplog.records)
    clone = LossAdaptiveController(0.3, max_step=0.05)
    clone.load_state_dict(dict(before))
    assert clone.state_dict() == before
    assert clone.update(0.5) == ctl.update(0.5)
    with pytest.raises(ValueError, match=r"unknown keys \['rate'\]"):
        clone.load_state_dict({**before, "rate": 0.1})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ratio": 0.5, "r_max": 1.5}, r"r_max must be in \[0, 1\].*got 1.5"),
        ({"ratio": 0.5, "r_min": 0.6, "r_max": 0.4}, r"r_min=0.6 > r_max=0.4"),
        ({"ratio": 0.9, "r_max": 0.8}, r"ratio must be in \[r_min, r_max\] = \[0.0, 0.8\]; got 0.9"),
        ({"ratio": 0.5, "ema": 1.0}, r"ema must be in \(0, 1\).*got 1.0"),
        ({"ratio": 0.5, "harder": "left"}, r"harder must be 'up'.*got 'left'"),
    ],
)
def test_loss_adaptive_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossAdaptiveController(**kwargs)


# --------------------------------------------------------------------------------------
# control_metrics
# --------------------------------------------------------------------------------------


def test_metrics_monotone_approach():
    s = [0.1, 0.3, 0.45, 0.495, 0.5]
    m = control_metrics(s, [0.5] * 5, tail_fraction=0.4)
    assert m["final_error"] == 0.0
    assert m["tail_max_error"] == pytest.approx(0.005)
    assert m["settled"] is True
    assert m["overshoot"] == 0.0
    assert m["settling_step"] == 3
    assert m["oscillation_amplitude"] == pytest.approx(0.0025)


def test_metrics_damped_oscillation():
    s = [0.2, 0.6, 0.44, 0.53, 0.492, 0.505, 0.498, 0.501, 0.4995, 0.5]
    m = control_metrics(s, [0.5] * 10)  # tail: last 2 steps
    assert m["overshoot"] == pytest.approx(0.1)
    assert m["settling_step"] == 4
    assert m["tail_max_error"] == pytest.approx(0.0005)
    assert m["oscillation_amplitude"] == pytest.approx(0.00025)
    above = control_metrics([0.9, 0.4, 0.55, 0.5], [0.5] * 4, tail_fraction=1.0)
    assert above["overshoot"] == pytest.approx(0.1)  # approach from above: t - min(s)
    assert above["oscillation_amplitude"] == pytest.approx(0.25)


def test_metrics_never_settling_and_never_reaching():
    m = control_metrics([0.1, 0.2, 0.3, 0.35], [0.5] * 4, tail_fraction=0.5, band=0.01)
    assert m["overshoot"] == 0.0 and m["settling_step"] is None and m["settled"] is False
    assert m["final_error"] == pytest.approx(0.15)
    assert m["tail_max_error"] == pytest.approx(0.2)
    assert m["oscillation_amplitude"] == pytest.approx(0.025)


def test_metrics_spike_in_tail():
    s = [0.1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.56, 0.5]
    m = control_metrics(s, [0.5] * 10, tail_fraction=0.3)
    assert m["final_error"] == 0.0
    assert m["settled"] is False and m["tail_max_error"] == pytest.approx(0.06)
    assert m["settling_step"] == 9
    assert m["overshoot"] == pytest.approx(0.06)
    assert m["oscillation_amplitude"] == pytest.approx(0.03)


def test_metrics_errors():
    with pytest.raises(ValueError, match=r"same length.*got 3 and 2"):
        control_metrics([0.1, 0.2, 0.3], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"empty"):
        control_metrics([], [])
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=rf"tail_fraction must be in \(0, 1\]; got {bad}"):
            control_metrics([0.1], [0.5], tail_fraction=bad)


def test_every_controller_implements_its_protocol():
    from learnmask.control import (
        FixedPenalty,
        LagrangianController,
        LossAdaptiveController,
        PenaltyController,
        PIController,
        PIDController,
        RatioController,
    )

    for controller in (LagrangianController(0.5), PIDController(0.5), PIController(0.5), FixedPenalty(0.1)):
        assert isinstance(controller, PenaltyController)
        assert not isinstance(controller, RatioController)
    assert isinstance(LossAdaptiveController(0.15, r_min=0.1, r_max=0.4), RatioController)

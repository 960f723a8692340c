"""PID control of the Lagrange multiplier of the sparsity constraint.

Plain dual ascent (:class:`~learnmask.control.lagrangian.LagrangianController`) is pure
*integral* control of the multiplier: ``lambda_1`` is the running sum of the constraint
error. Stooke, Achiam & Abbeel (2020, "Responsive Safety in Reinforcement Learning by PID
Lagrangian Methods") set the multiplier by a full PID law on the error instead, and
Sohrabi et al. (2024, "On PI Controllers for Updating Lagrange Multipliers in Constrained
Optimization") analyse the PI case with an exponentially smoothed proportional term
(their nuPI). :class:`PIDController` applies that law to the sparsity constraint
``s = t`` (an *equality*, so the multiplier takes any sign and is not projected to >= 0).

Terms (``sparsity = 1 - keep_ratio`` in [0, 1], ``target`` ``t`` in [0, 1), error
``e = s - t``, all per optimizer step)::

    integral += ki * clip(e, -integral_clip, integral_clip)     # I, in multiplier units
    xi        = ema * xi + (1 - ema) * e                         # smoothed error (nuPI)
    lambda_1  = integral + kp * xi + kd * (xi - xi_previous)     # used by the next penalty

and the model minimises ``loss + lambda_1 (s - t) + (damping / 2)(s - t)^2``.
"""

from __future__ import annotations

import logging
from typing import Any

from .lagrangian import (
    MultiplierController,
    _check_real,
    _check_state_keys,
    _check_step_count,
)
from .schedules import Schedule

__all__ = ["PIDController", "PIController"]

logger = logging.getLogger(__name__)


def _check_ema(value: object) -> float:
    ema = _check_real(value, "ema", minimum=0.0)
    if ema >= 1.0:
        raise ValueError(f"ema must be in [0, 1) (0 = no smoothing); got {ema!r}")
    return ema


def _check_integral_clip(value: object) -> float | None:
    if value is None:
        return None
    return _check_real(value, "integral_clip", positive=True)


class PIDController(MultiplierController):
    """Drive the expected sparsity ``s`` to a target ``t(step)`` with a PID multiplier.

    Same interface as :class:`~learnmask.control.lagrangian.LagrangianController`
    (``penalty(s)`` then ``step()`` once per optimizer step). The penalty is

        ``penalty = lambda_1 (s - t) + (damping / 2)(s - t)^2``

    with ``lambda_1`` a constant (gradient flows to ``s`` only), and after each step
    ``lambda_1 = I + kp * xi + kd * (xi - xi_prev)`` where ``I`` accumulates
    ``ki * clip(e, +-integral_clip)``, ``e = s - t``, and ``xi`` is the exponential mean of
    ``e`` (``ema = 0``: ``xi = e``). The first finite error sets ``xi = e`` and gives no
    derivative kick. Sources: Stooke, Achiam & Abbeel (2020) (PID Lagrangian); Sohrabi
    et al. (2024) (nuPI: the ``ema``-smoothed proportional term); the damping term is
    Platt & Barr (1988), as in ``LagrangianController``.

    **Sign.** The model minimises the penalty; the multiplier moves *with* the error, as
    in dual ascent: ``s < t`` makes ``lambda_1`` negative, so ``d penalty / d s < 0``
    pushes ``s`` up (case C1: ``ki = 1``, ``kp = kd = 0``, ``s = 0.3``, ``t = 0.5``: one step
    gives ``lambda_1 = -0.2``).

    **Relation to dual ascent.** ``kp = kd = 0``, ``ki = lr``, ``integral_clip = None``
    reproduces ``LagrangianController(lr=lr, damping=damping)`` with ``lambda_2`` held at 0
    exactly (bit for bit). The ``damping`` term is an *undelayed* proportional action (its
    force ``damping * e`` acts in the same step); ``kp`` acts one step later through the
    multiplier.

    **Anti-windup** (Astrom & Murray, 2008, "Feedback Systems", sec. 10.4). Far from the
    target the error is large for many steps; an unclipped integral winds up and drives
    ``s`` past the target. Clipping the integrator input to ``+-integral_clip`` keeps the
    full integral rate near the target (where it removes steady-state error against an
    opposing task gradient) and bounds the windup during the approach. ``None`` disables.

    **Defaults** (``kp = 1``, ``ki = 0.1``, ``kd = 0``, ``damping = 10``, ``ema = 0``,
    ``integral_clip = 0.01``), tuned on the toy plant ``s = sigmoid(theta)``, ``s0 = 0.1``,
    ``t = 0.5``, 1000 steps, float64:

    * Adam on ``theta`` (lr 0.05): overshoot 0.036 (LagrangianController default: 0.042),
      ``|s - t| <= 0.01`` from step 78; against an opposing task gradient ``-0.5 s`` it
      settles (step ~485, final error < 1e-3) where the Lagrangian default (integral
      time constant ``damping / lr = 1000`` steps) still errs by ~0.03 at step 1000.
    * SGD lr 1.0: overshoot 0.0008, settled from step 6; SGD lr 0.1: 0.0054, step 67.

    With Adam, the damping term alone (``ki = kp = 0``) already overshoots 0.032 on this
    plant: Adam's momentum carries ``s`` past the target, and no P or I gain can brake
    before the crossing, so a PI law cannot go below ~0.03 here; ``kd > 0`` can
    (``kd = 10``: 0.031), at the cost of SGD stability (``kd >= 15`` diverges with
    SGD lr 1.0). With SGD the per-step loop gain ``sgd_lr * (damping + kp) * (ds/dtheta)^2``
    must stay well below 2 (``ds/dtheta = 0.25`` at ``s = 0.5``).

    Non-finite measurements never corrupt state: ``penalty(nan)`` returns a zero tensor
    and the following :meth:`step` leaves the integral, the smoothed error and
    ``lambda_1`` untouched (``step_count`` still advances), logging a warning.

    Args:
        target: target sparsity in [0, 1) (a float), or a schedule ``step -> target``.
        kp: proportional gain >= 0 (multiplier units per unit of sparsity error).
        ki: integral gain >= 0 (multiplier units per unit of error per step; the
            dual-ascent learning rate).
        kd: derivative gain >= 0 (multiplier units per unit of error change per step).
        damping: coefficient ``c`` >= 0 of ``(c / 2)(s - t)^2``; 0 disables it.
        ema: smoothing ``nu`` in [0, 1) of the error for the P and D terms; 0 = none.
        integral_clip: bound > 0 on ``|e|`` fed to the integrator (sparsity units), or
            ``None`` for no anti-windup.
        lambda_1: initial multiplier (and integral), finite, any sign.

    Raises:
        ValueError: a target outside [0, 1), a negative gain or damping, ``ema``
            outside [0, 1), ``integral_clip <= 0`` or a non-finite value.
        TypeError: ``target`` is neither a real number nor callable.
    """

    _STATE_KEYS = {"lambda_1", "integral", "error_ema", "step_count"}

    def __init__(
        self,
        target: float | Schedule,
        *,
        kp: float = 1.0,
        ki: float = 0.1,
        kd: float = 0.0,
        damping: float = 10.0,
        ema: float = 0.0,
        integral_clip: float | None = 0.01,
        lambda_1: float = 0.0,
    ) -> None:
        self._setup(target, damping, lambda_1)
        self.kp = _check_real(kp, "kp", minimum=0.0)
        self.ki = _check_real(ki, "ki", minimum=0.0)
        self.kd = _check_real(kd, "kd", minimum=0.0)
        self.ema = _check_ema(ema)
        self.integral_clip = _check_integral_clip(integral_clip)
        self.integral = self.lambda_1
        self.error_ema: float | None = None  # xi; None until the first finite error
        self._terms = {"p_term": 0.0, "i_term": self.integral, "d_term": 0.0}
        _ = self.target  # validate the schedule's value at step 0 now

    def _update(self, error: float) -> None:
        clipped = error
        if self.integral_clip is not None:
            clipped = min(max(error, -self.integral_clip), self.integral_clip)
        self.integral += self.ki * clipped
        previous = self.error_ema
        if previous is None:
            self.error_ema = error
            change = 0.0
        else:
            self.error_ema = self.ema * previous + (1.0 - self.ema) * error
            change = self.error_ema - previous
        p_term, d_term = self.kp * self.error_ema, self.kd * change
        # With kp = kd = 0 this adds exact zeros: lambda_1 == integral bit for bit.
        self.lambda_1 = self.integral + p_term + d_term
        self._terms = {"p_term": p_term, "i_term": self.integral, "d_term": d_term}

    def last_metrics(self) -> dict[str, float]:
        """Values for logging: ``target`` (current), ``sparsity`` and ``penalty`` (last
        :meth:`penalty` call; NaN before the first), ``lambda_1`` (current) and its parts
        ``p_term``, ``i_term``, ``d_term`` (from the last finite update)."""
        return {
            "target": self.target,
            "sparsity": self._last["sparsity"],
            "lambda_1": self.lambda_1,
            "penalty": self._last["penalty"],
            **self._terms,
        }

    def state_dict(self) -> dict[str, float | int | None]:
        """``{"lambda_1": float, "integral": float, "error_ema": float | None,
        "step_count": int}`` (plain Python). Gains, ``damping``, ``ema``,
        ``integral_clip`` and the target schedule are configuration, not state."""
        return {
            "lambda_1": self.lambda_1,
            "integral": self.integral,
            "error_ema": self.error_ema,
            "step_count": self.step_count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` exactly; clears any recorded ``s``.

        Raises:
            ValueError: missing or unknown keys, a non-finite value or ``step_count < 0``.
            TypeError: a value of the wrong type.
        """
        _check_state_keys(state, self._STATE_KEYS, type(self).__name__)
        lambda_1 = _check_real(state["lambda_1"], "lambda_1")
        integral = _check_real(state["integral"], "integral")
        error_ema = state["error_ema"]
        if error_ema is not None:
            error_ema = _check_real(error_ema, "error_ema")
        step_count = _check_step_count(state["step_count"])
        self.lambda_1, self.integral, self.error_ema = lambda_1, integral, error_ema
        self.step_count = step_count
        self._pending = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(target={self._schedule!r}, kp={self.kp}, ki={self.ki}, "
            f"kd={self.kd}, damping={self.damping}, ema={self.ema}, "
            f"integral_clip={self.integral_clip}, lambda_1={self.lambda_1}, "
            f"step_count={self.step_count})"
        )


class PIController(PIDController):
    """:class:`PIDController` with ``kd = 0``: the PI / nuPI multiplier (Sohrabi et al.,
    2024, "On PI Controllers for Updating Lagrange Multipliers in Constrained
    Optimization"; Stooke, Achiam & Abbeel, 2020). Same defaults and errors."""

    def __init__(
        self,
        target: float | Schedule,
        *,
        kp: float = 1.0,
        ki: float = 0.1,
        damping: float = 10.0,
        ema: float = 0.0,
        integral_clip: float | None = 0.01,
        lambda_1: float = 0.0,
    ) -> None:
        super().__init__(
            target, kp=kp, ki=ki, kd=0.0, damping=damping, ema=ema,
            integral_clip=integral_clip, lambda_1=lambda_1,
        )

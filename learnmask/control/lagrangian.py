"""The Lagrangian (dual-ascent) sparsity controller; the fixed L0 baseline is in ``fixed_penalty``.

Definitions used throughout (the field's names; see STYLE.md):

* ``keep_ratio`` -- expected fraction of gated units kept, in [0, 1];
* ``sparsity = 1 - keep_ratio`` -- expected fraction removed, in [0, 1]. The controllers
  take the *measured* expected sparsity ``s`` of a gated model as a 0-dim tensor that
  carries gradient to the gate parameters (e.g. ``1 - expected_l0 / total``);
* ``target`` -- the wanted sparsity ``t``, in [0, 1), possibly scheduled over steps.

Usage in a training step (the multipliers are *not* optimizer parameters)::

    loss = task_loss + ctl.penalty(s)   # penalty is differentiable in s only
    loss.backward(); opt.step(); opt.zero_grad()
    ctl.step()                          # dual ascent on lambda_1, lambda_2
    log(ctl.last_metrics())

Keeping the multipliers out of the model optimizer avoids the classic sign bug of putting
them in it and forgetting to negate their learning rate: the model *minimises*
``loss + penalty`` while the controller *maximises* it over the multipliers.
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Any

import torch
from torch import Tensor

from learnmask import distributed

from .schedules import ConstantTarget, Schedule, check_target_sparsity

__all__ = ["lagrangian_penalty", "MultiplierController", "LagrangianController"]

logger = logging.getLogger(__name__)

# Measured sparsities this far outside [0, 1] are float round-off; further out is a bug.
_SPARSITY_TOLERANCE = 1e-6


def lagrangian_penalty(
    sparsity: Tensor | float,
    target: Tensor | float,
    lambda_1: Tensor | float,
    lambda_2: Tensor | float,
) -> Tensor:
    """The Lagrangian sparsity penalty ``lambda_1 * (s - t) + lambda_2 * (s - t) ** 2``.

    From CoFi pruning (Xia et al., 2022, "Structured Pruning Learns Compact and Accurate
    Models") and Wang et al. (2020, "Structured Pruning of Large Language Models").
    A pure function: differentiable in *every* argument that is a tensor with
    ``requires_grad``, so ``d/d lambda_1 = s - t`` and ``d/d lambda_2 = (s - t) ** 2``
    can be checked with autograd.

    Args:
        sparsity: measured expected sparsity ``s``, 0-dim (or broadcastable), in [0, 1].
        target: target sparsity ``t``, in [0, 1).
        lambda_1: linear multiplier (any sign).
        lambda_2: quadratic multiplier (>= 0 under dual ascent).

    Returns:
        The penalty, a tensor with the broadcast shape of the arguments (0-dim for scalars).
    """
    gap = sparsity - target
    penalty = lambda_1 * gap + lambda_2 * gap * gap
    if not isinstance(penalty, Tensor):
        penalty = torch.tensor(penalty, dtype=torch.get_default_dtype())
    return penalty


def _check_real(value: object, name: str, *, minimum: float | None = None,
                positive: bool = False) -> float:
    """Validate a finite real config value and return it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value!r}")
    if positive and value <= 0.0:
        raise ValueError(f"{name} must be > 0; got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value!r}")
    return value


def _check_step_count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"step_count must be an int >= 0; got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"step_count must be >= 0; got {value}")
    return int(value)


def _as_sparsity(s: Tensor | float) -> tuple[Tensor, float]:
    """Return ``(s as a 0-dim tensor, its value as a float)``; the float may be NaN/inf.

    Raises:
        ValueError: ``s`` is not 0-dim, or is finite but outside [0, 1].
    """
    if not isinstance(s, Tensor):
        s = torch.tensor(float(s), dtype=torch.get_default_dtype())
    if s.dim() != 0:
        raise ValueError(
            f"sparsity must be a 0-dim tensor (the expected sparsity of the whole model); "
            f"got shape {tuple(s.shape)}"
        )
    value = float(s.detach())
    if math.isfinite(value) and not (
        -_SPARSITY_TOLERANCE <= value <= 1.0 + _SPARSITY_TOLERANCE
    ):
        raise ValueError(
            f"sparsity must be in [0, 1] (fraction of units removed); got {value!r}. "
            "Pass 1 - keep_ratio, not a count of units."
        )
    return s, value


def _check_state_keys(state: dict[str, Any], expected: set[str], owner: str) -> None:
    if not isinstance(state, dict):
        raise TypeError(f"{owner}.load_state_dict expects a dict; got {type(state).__name__}")
    missing = sorted(expected - state.keys())
    unknown = sorted(state.keys() - expected)
    if missing or unknown:
        raise ValueError(
            f"{owner}.load_state_dict: missing keys {missing}, unknown keys {unknown}; "
            f"expected exactly {sorted(expected)}"
        )


class MultiplierController:
    """Shared part of the controllers whose penalty is ``lambda_1 (s-t) + (lambda_2 + c/2)(s-t)^2``.

    Subclasses set ``lambda_1`` (and ``lambda_2``, 0 unless they move it) and implement
    :meth:`_update`, which moves the multipliers from a finite error ``e = s - t``.
    Holds the target schedule, the damping coefficient ``c``, the step counter and the
    ``s`` recorded by :meth:`penalty` for the next :meth:`step`.
    """

    lambda_2: float = 0.0

    def _setup(self, target: float | Schedule, damping: float, lambda_1: float) -> None:
        if isinstance(target, numbers.Real) and not isinstance(target, bool):
            target = ConstantTarget(float(target))
        elif not callable(target):
            raise TypeError(
                "target must be a float in [0, 1) or a schedule callable(step) -> float; "
                f"got {type(target).__name__}"
            )
        self._schedule: Schedule = target
        self.damping = _check_real(damping, "damping", minimum=0.0)
        self.lambda_1 = _check_real(lambda_1, "lambda_1")
        self.step_count = 0
        self._pending: tuple[float, float] | None = None  # (s, t) recorded by penalty()
        self._last: dict[str, float] = {"sparsity": math.nan, "penalty": math.nan}

    @property
    def target(self) -> float:
        """Current target sparsity ``t(step_count)``, a float in [0, 1).

        Raises:
            ValueError: the schedule returned a value outside [0, 1).
        """
        return check_target_sparsity(self._schedule(self.step_count), "schedule(step)")

    def penalty(self, s: Tensor | float) -> Tensor:
        """Penalty for the measured sparsity ``s``; records ``s`` for the next :meth:`step`.

        Args:
            s: expected sparsity of the gated model, a 0-dim tensor in [0, 1] with gradient
                to the gates (a float is accepted and wrapped).

        Returns:
            0-dim tensor ``lambda_1 (s-t) + lambda_2 (s-t)^2 + (damping/2)(s-t)^2`` with
            the multipliers as constants (gradient flows to ``s`` only). If ``s`` is NaN or
            inf, a zero tensor (no gradient) on ``s``'s device and dtype, and a warning is
            logged.

        Raises:
            ValueError: ``s`` is not 0-dim, or is finite but outside [0, 1].
        """
        s, value = _as_sparsity(s)
        t = self.target
        self._pending = (value, t)
        if not math.isfinite(value):
            logger.warning(
                "%s.penalty: non-finite sparsity %r at step %d; returning a zero penalty",
                type(self).__name__, value, self.step_count,
            )
            self._last = {"sparsity": value, "penalty": 0.0}
            return s.detach().new_zeros(())
        gap = value - t
        self._last = {
            "sparsity": value,
            "penalty": self.lambda_1 * gap + (self.lambda_2 + 0.5 * self.damping) * gap * gap,
        }
        penalty = lagrangian_penalty(s, t, self.lambda_1, self.lambda_2)
        if self.damping:
            penalty = penalty + 0.5 * self.damping * (s - t) ** 2
        return penalty

    def step(self) -> None:
        """Move the multipliers with the ``s`` recorded by :meth:`penalty`, then count the step.

        The recorded ``s`` is consumed: each step needs a fresh :meth:`penalty` call. A
        non-finite recorded ``s`` leaves the multipliers unchanged (warning logged) but
        still advances ``step_count``. Under ``torch.distributed`` (two or more ranks) the
        multipliers move with ``s`` averaged over ranks (:func:`learnmask.distributed.mean`), so
        every rank holds the same state; every rank must call ``step`` at the same steps.

        Raises:
            RuntimeError: no ``s`` recorded since the last step.
        """
        if self._pending is None:
            raise RuntimeError(
                f"{type(self).__name__}.step() called with no recorded sparsity; "
                "call penalty(s) first in each training step, then step() once"
            )
        s, t = self._pending
        self._pending = None
        s = distributed.mean(s)
        if math.isfinite(s):
            self._update(s - t)
        else:
            logger.warning(
                "%s.step: non-finite sparsity %r at step %d; multipliers left unchanged "
                "(lambda_1=%r, lambda_2=%r)", type(self).__name__, s, self.step_count, self.lambda_1, self.lambda_2,
            )
        self.step_count += 1

    def _update(self, error: float) -> None:
        raise NotImplementedError


class LagrangianController(MultiplierController):
    """Drive the expected sparsity ``s`` to a target ``t(step)`` by dual ascent.

    The model minimises ``loss + penalty(s)`` with

        ``penalty = lambda_1 (s - t) + lambda_2 (s - t)^2 + (damping / 2) (s - t)^2``

    (CoFi pruning, Xia et al., 2022; Wang et al., 2020) while the multipliers are
    *maximised* by explicit gradient ascent, one step per :meth:`step`::

        lambda_1 += lr * (s - t)        # = lr * d penalty / d lambda_1
        lambda_2 += lr * (s - t) ** 2   # = lr * d penalty / d lambda_2

    So with ``s < t`` (too dense) ``lambda_1`` goes negative, and ``d penalty / d s`` then
    pushes ``s`` up; ``lambda_2`` only grows, and acts like an augmented-Lagrangian term.

    **Damping.** With ``damping = 0`` this is the plain method, and it is an undamped
    integrator in closed loop: ``lambda_1`` keeps accumulating error until ``s`` passes
    ``t``, so ``s`` overshoots and oscillates. On the toy plant ``s = sigmoid(theta)``,
    ``s0 = 0.1``, ``t = 0.5`` it overshoots by ~0.34 for every ``lr`` tried (SGD or Adam on
    ``theta``). The default therefore adds the fixed quadratic term
    ``(damping / 2)(s - t)^2`` of Platt & Barr's *modified differential method of
    multipliers* (Platt & Barr, 1988, "Constrained Differential Optimization"), which adds
    a restoring force proportional to the error (a proportional term next to the
    integral ``lambda_1``) and damps the primal-dual oscillation. ``damping = 0`` gives
    exactly the CoFi penalty.

    **Defaults** (``lr = 0.01``, ``damping = 10``), tuned on the toy plant above (measured
    in float64, 2000 steps):

    * SGD on ``theta`` with lr 1.0: ``|s - t| < 0.01`` from step 7 on, overshoot 0.0015;
    * SGD lr 0.3: settles at step 25, overshoot 0.0044; SGD lr 0.1: step 337, 0.012;
    * Adam on ``theta`` (lr 0.05, the realistic case for gate logits): settles at step
      131, overshoot 0.042.

    Adam is invariant to the scale of the penalty, so with Adam only the ratio
    ``damping / lr`` matters: larger means less overshoot, but a slower integral action,
    whose time constant to cancel a steady opposing task gradient is about
    ``damping / lr`` steps (1000 with the defaults). With SGD the linearised loop gain
    per step is ``sgd_lr * damping * (ds/dtheta)^2``, which must stay below 2: on the toy
    plant (``ds/dtheta = 0.25`` at ``s = 0.5``) that is ``sgd_lr * damping < 32``.

    Non-finite measurements never corrupt state: ``penalty(nan)`` returns a zero tensor and
    the following :meth:`step` leaves the multipliers untouched (it still advances
    ``step_count``, so the schedule stays aligned with the optimizer), logging a warning.

    Args:
        target: target sparsity in [0, 1) (a float), or a schedule ``step -> target``
            (see :mod:`learnmask.control.schedules`).
        lr: dual-ascent learning rate, > 0 (multiplier units per unit of sparsity error per
            step).
        lambda_1: initial linear multiplier, finite, any sign.
        lambda_2: initial quadratic multiplier, finite, >= 0.
        damping: coefficient ``c`` >= 0 of the damping term ``(c / 2)(s - t)^2``; 0
            disables it.

    Raises:
        ValueError: a target outside [0, 1), ``lr <= 0``, ``lambda_2 < 0``,
            ``damping < 0`` or a non-finite value.
        TypeError: ``target`` is neither a real number nor callable.
    """

    _STATE_KEYS = {"lambda_1", "lambda_2", "step_count"}

    def __init__(
        self,
        target: float | Schedule,
        *,
        lr: float = 0.01,
        lambda_1: float = 0.0,
        lambda_2: float = 0.0,
        damping: float = 10.0,
    ) -> None:
        self._setup(target, damping, lambda_1)
        self.lr = _check_real(lr, "lr", positive=True)
        self.lambda_2 = _check_real(lambda_2, "lambda_2", minimum=0.0)
        _ = self.target  # validate the schedule's value at step 0 now, not mid-training

    def _update(self, error: float) -> None:
        """Dual ascent: ``lambda_1 += lr e``, ``lambda_2 += lr e^2``."""
        self.lambda_1 += self.lr * error
        self.lambda_2 += self.lr * error * error

    def last_metrics(self) -> dict[str, float]:
        """Values for logging: ``target`` (current), ``sparsity`` and ``penalty`` (from the
        last :meth:`penalty` call; NaN before the first), ``lambda_1``, ``lambda_2``
        (current)."""
        return {
            "target": self.target,
            "sparsity": self._last["sparsity"],
            "lambda_1": self.lambda_1,
            "lambda_2": self.lambda_2,
            "penalty": self._last["penalty"],
        }

    def state_dict(self) -> dict[str, float | int]:
        """``{"lambda_1": float, "lambda_2": float, "step_count": int}`` (plain Python).

        The target schedule, ``lr`` and ``damping`` are configuration, not state; rebuild
        the controller with the same arguments before :meth:`load_state_dict`.
        """
        return {
            "lambda_1": self.lambda_1,
            "lambda_2": self.lambda_2,
            "step_count": self.step_count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` exactly; clears any recorded ``s``.

        Raises:
            ValueError: missing or unknown keys, non-finite multipliers, ``lambda_2 < 0``
                or ``step_count < 0``.
            TypeError: a value of the wrong type.
        """
        _check_state_keys(state, self._STATE_KEYS, type(self).__name__)
        lambda_1 = _check_real(state["lambda_1"], "lambda_1")
        lambda_2 = _check_real(state["lambda_2"], "lambda_2", minimum=0.0)
        step_count = _check_step_count(state["step_count"])
        self.lambda_1, self.lambda_2, self.step_count = lambda_1, lambda_2, step_count
        self._pending = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(target={self._schedule!r}, lr={self.lr}, "
            f"damping={self.damping}, lambda_1={self.lambda_1}, lambda_2={self.lambda_2}, "
            f"step_count={self.step_count})"
        )

"""Target-sparsity schedules: ``schedule(step) -> target sparsity``.

A schedule maps an optimisation step (an ``int`` >= 0, counted in optimizer steps) to a
target *sparsity* in [0, 1), where ``sparsity = 1 - keep_ratio`` is the fraction of gated
units removed. A target of 1.0 (remove everything) is rejected: no controller can hold it
and it is almost always a keep-ratio passed by mistake.

All schedules are frozen dataclasses, validated when built, so a bad config fails at
construction time rather than thousands of steps into training.

Schedules:

* :class:`ConstantTarget` -- the same target at every step.
* :class:`LinearWarmup` -- linear ramp from ``initial`` to ``final`` over ``warmup_steps``
  (the warm-up used by CoFi pruning; Xia et al., 2022).
* :class:`CubicWarmup` -- the cubic gradual-pruning schedule of Zhu & Gupta (2017),
  "To prune, or not to prune": fast early, gentle near the final target.

Every schedule holds ``final`` after the warm-up. ``warmup_steps = 0`` jumps straight to
``final`` at step 0.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

__all__ = [
    "Schedule",
    "ConstantTarget",
    "LinearWarmup",
    "CubicWarmup",
    "make_schedule",
    "SCHEDULE_KINDS",
    "check_target_sparsity",
]

#: Anything callable as ``schedule(step: int) -> float`` (target sparsity in [0, 1)).
Schedule = Callable[[int], float]

#: The ``kind`` names accepted by :func:`make_schedule`.
SCHEDULE_KINDS: tuple[str, ...] = ("constant", "linear", "cubic")


def check_target_sparsity(value: object, field: str = "target") -> float:
    """Validate a target sparsity and return it as a ``float``.

    Args:
        value: the target sparsity, a real number in [0, 1).
        field: the name of the config field, used in the error message.

    Returns:
        ``float(value)``.

    Raises:
        TypeError: ``value`` is not a real number (``bool`` is rejected too).
        ValueError: ``value`` is NaN/inf, negative, or >= 1, e.g.
            "target sparsity must be in [0, 1); got 1.2 (field `final`)".
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"target sparsity must be a real number in [0, 1); got {type(value).__name__} "
            f"{value!r} (field `{field}`)"
        )
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(
            f"target sparsity must be in [0, 1); got {value!r} (field `{field}`). "
            "Sparsity is the fraction removed (1 - keep_ratio); did you pass a keep ratio?"
        )
    return value


def _check_warmup_steps(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"warmup_steps must be an int >= 0; got {type(value).__name__} {value!r}"
        )
    if value < 0:
        raise ValueError(f"warmup_steps must be >= 0 (0 means no warm-up); got {value}")
    return int(value)


def _check_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an int >= 0; got {type(step).__name__} {step!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0; got {step}")
    return int(step)


@dataclass(frozen=True)
class ConstantTarget:
    """The same target sparsity at every step.

    Args:
        value: target sparsity in [0, 1).

    Raises:
        ValueError: ``value`` is outside [0, 1) or not finite.
    """

    value: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", check_target_sparsity(self.value, "value"))

    def __call__(self, step: int) -> float:
        """Target sparsity at ``step`` (an int >= 0); always ``value``."""
        _check_step(step)
        return self.value


@dataclass(frozen=True)
class _Warmup:
    """Shared part of the warm-up schedules: validation, hold after ``warmup_steps``."""

    final: float
    warmup_steps: int
    initial: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "final", check_target_sparsity(self.final, "final"))
        object.__setattr__(self, "initial", check_target_sparsity(self.initial, "initial"))
        object.__setattr__(self, "warmup_steps", _check_warmup_steps(self.warmup_steps))

    def __call__(self, step: int) -> float:
        """Target sparsity at ``step`` (an int >= 0), in [0, 1)."""
        step = _check_step(step)
        if step >= self.warmup_steps:
            return self.final
        return self._ramp(step / self.warmup_steps)

    def _ramp(self, frac: float) -> float:
        raise NotImplementedError


@dataclass(frozen=True)
class LinearWarmup(_Warmup):
    """Linear ramp of the target sparsity, then hold (CoFi pruning; Xia et al., 2022).

    ``t(step) = initial + (final - initial) * step / warmup_steps`` for
    ``step < warmup_steps``, and ``final`` afterwards. At half the warm-up the target is
    half-way between ``initial`` and ``final``.

    Args:
        final: target sparsity after the warm-up, in [0, 1).
        warmup_steps: length of the ramp in optimizer steps, >= 0; 0 means ``final`` from
            step 0.
        initial: target sparsity at step 0, in [0, 1). Default 0.0 (dense).

    Raises:
        ValueError: a target outside [0, 1), or ``warmup_steps < 0``.
        TypeError: ``warmup_steps`` is not an int.
    """

    def _ramp(self, frac: float) -> float:
        return self.initial + (self.final - self.initial) * frac


@dataclass(frozen=True)
class CubicWarmup(_Warmup):
    """Cubic gradual-pruning schedule, then hold (Zhu & Gupta, 2017).

    ``t(step) = final + (initial - final) * (1 - step / warmup_steps) ** 3`` for
    ``step < warmup_steps``, and ``final`` afterwards. The target moves fastest at the
    start, when many redundant units can go cheaply, and slows near ``final``.

    Args:
        final: target sparsity after the warm-up, in [0, 1).
        warmup_steps: length of the ramp in optimizer steps, >= 0; 0 means ``final`` from
            step 0.
        initial: target sparsity at step 0, in [0, 1). Default 0.0 (dense).

    Raises:
        ValueError: a target outside [0, 1), or ``warmup_steps < 0``.
        TypeError: ``warmup_steps`` is not an int.
    """

    def _ramp(self, frac: float) -> float:
        return self.final + (self.initial - self.final) * (1.0 - frac) ** 3


def make_schedule(
    kind: str, final: float, warmup_steps: int, initial: float = 0.0
) -> ConstantTarget | LinearWarmup | CubicWarmup:
    """Build a target-sparsity schedule from config values.

    Args:
        kind: one of ``"constant"``, ``"linear"``, ``"cubic"``.
        final: target sparsity after the warm-up, in [0, 1).
        warmup_steps: ramp length in optimizer steps, >= 0. Validated but unused for
            ``"constant"``.
        initial: target sparsity at step 0, in [0, 1). Validated but unused for
            ``"constant"``.

    Returns:
        :class:`ConstantTarget`, :class:`LinearWarmup` or :class:`CubicWarmup`.

    Raises:
        ValueError: unknown ``kind`` (the message lists the known kinds), a target outside
            [0, 1), or ``warmup_steps < 0``.
    """
    if kind == "constant":
        _check_warmup_steps(warmup_steps)
        check_target_sparsity(initial, "initial")
        return ConstantTarget(final)
    if kind == "linear":
        return LinearWarmup(final, warmup_steps, initial)
    if kind == "cubic":
        return CubicWarmup(final, warmup_steps, initial)
    raise ValueError(
        f"unknown schedule kind {kind!r}; expected one of {', '.join(SCHEDULE_KINDS)}"
    )

"""Masking-rate schedules: ``schedule(step) -> mlm_probability`` in [0, 1].

Ankner et al. (2023, "Dynamic Masking Rate Schedules for MLM Pretraining") find that
*decaying* the masking rate during training (linearly from 30% to 15% for BERT-base) beats
any fixed rate. These schedules give the rate at each optimizer step (an ``int`` >= 0);
after ``total_steps`` they hold ``final``. For a rate moved by the training loss instead,
see :class:`~learnmask.control.LossAdaptiveController` (``harder="up"``).

* :class:`ConstantRate` -- the same rate at every step (BERT's 0.15; Wettig et al., 2023: 0.4).
* :class:`LinearDecay` -- ``initial`` to ``final`` linearly over ``total_steps``.
* :class:`CosineDecay` -- ``initial`` to ``final`` along half a cosine over ``total_steps``.

"Decay" is the usual direction; ``final > initial`` is allowed and ramps the rate up.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from learnmask.control.schedules import _check_step, _check_warmup_steps

__all__ = ["ConstantRate", "LinearDecay", "CosineDecay", "RATE_SCHEDULE_KINDS", "make_rate_schedule"]

#: The ``kind`` names accepted by :func:`make_rate_schedule`.
RATE_SCHEDULE_KINDS: tuple[str, ...] = ("constant", "linear", "cosine")


def check_probability(value: object, name: str) -> float:
    """A masking rate as a float in [0, 1]; ``TypeError`` for a non-number, ``ValueError`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number in [0, 1]; got {type(value).__name__} {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] (a masking rate); got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ConstantRate:
    """The same masking rate ``value`` (in [0, 1]) at every step.

    Raises:
        ValueError: ``value`` outside [0, 1].
    """

    value: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", check_probability(self.value, "value"))

    def __call__(self, step: int) -> float:
        """The rate at ``step`` (an int >= 0): always ``value``."""
        _check_step(step)
        return self.value


@dataclass(frozen=True)
class _Decay:
    """Shared part: validation and hold at ``final`` from ``total_steps`` on."""

    initial: float
    final: float
    total_steps: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "initial", check_probability(self.initial, "initial"))
        object.__setattr__(self, "final", check_probability(self.final, "final"))
        object.__setattr__(self, "total_steps", _check_warmup_steps(self.total_steps))

    def __call__(self, step: int) -> float:
        """The rate at ``step`` (an int >= 0), between ``initial`` and ``final``."""
        step = _check_step(step)
        if step >= self.total_steps:
            return self.final
        return self._shape(step / self.total_steps)

    def _shape(self, frac: float) -> float:
        raise NotImplementedError


@dataclass(frozen=True)
class LinearDecay(_Decay):
    """``r(t) = initial + (final - initial) * t / total_steps``, then ``final`` (Ankner et al., 2023).

    Args:
        initial: rate at step 0, in [0, 1].
        final: rate at and after ``total_steps``, in [0, 1].
        total_steps: length of the decay in optimizer steps, >= 0 (0: ``final`` from step 0).

    Raises:
        ValueError: a rate outside [0, 1] or ``total_steps < 0``.
        TypeError: ``total_steps`` not an int.
    """

    def _shape(self, frac: float) -> float:
        return self.initial + (self.final - self.initial) * frac


@dataclass(frozen=True)
class CosineDecay(_Decay):
    """``r(t) = final + (initial - final) * (1 + cos(pi t / total_steps)) / 2``, then ``final``.

    Flat at both ends, fastest in the middle (the cosine schedule of Ankner et al., 2023).
    Arguments and errors as :class:`LinearDecay`.
    """

    def _shape(self, frac: float) -> float:
        return self.final + (self.initial - self.final) * 0.5 * (1.0 + math.cos(math.pi * frac))


def make_rate_schedule(
    kind: str, initial: float, final: float, total_steps: int
) -> ConstantRate | LinearDecay | CosineDecay:
    """A masking-rate schedule from config values.

    Args:
        kind: ``"constant"`` (rate ``initial``; ``final`` is ignored), ``"linear"`` or ``"cosine"``.
        initial, final: rates in [0, 1].
        total_steps: decay length in optimizer steps, >= 0.

    Raises:
        ValueError: unknown ``kind`` (the message lists the known ones), a rate outside [0, 1].
    """
    if kind == "constant":
        return ConstantRate(initial)
    if kind == "linear":
        return LinearDecay(initial, final, total_steps)
    if kind == "cosine":
        return CosineDecay(initial, final, total_steps)
    raise ValueError(f"unknown rate schedule kind {kind!r}; expected one of {', '.join(RATE_SCHEDULE_KINDS)}")

"""Temperature annealing for gates with a temperature (hard-concrete β, Gumbel-sigmoid τ).

A low temperature makes samples nearly binary (train and eval masks agree); a high one keeps
gradients informative early on. Annealing from high to low is the usual compromise: Jang, Gu &
Poole (2017) anneal τ exponentially, τ_t = max(τ_end, τ_start · exp(-r t)); here the rate r is
chosen so that τ reaches ``end`` exactly at ``steps``.

Units: temperatures are positive floats; ``step`` and ``steps`` are optimizer steps (ints >= 0).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from learnmask.functional import _check_temperature
from learnmask.gates.base import Gate

__all__ = ["SCHEDULES", "temperature_at", "TemperatureAnnealer"]

#: Shapes of the path from ``start`` to ``end``.
SCHEDULES = ("exponential", "linear", "cosine", "constant")


def temperature_at(step: int, *, start: float, end: float, steps: int, kind: str = "exponential") -> float:
    """Temperature after ``step`` optimizer steps of an annealing schedule.

    Args:
        step: steps taken, int >= 0; past ``steps`` the temperature stays at ``end``.
        start: temperature at step 0, > 0.
        end: temperature at ``steps`` and after, > 0.
        steps: length of the schedule, int >= 1.
        kind: "exponential" (geometric: start · (end/start)^(t/steps), Jang et al. 2017),
            "linear", "cosine" (half cosine from start to end) or "constant" (``start`` always).

    Returns:
        A float > 0, between ``start`` and ``end``.

    Raises:
        ValueError: a temperature <= 0, steps < 1, step < 0, or an unknown kind.
    """
    start, end = _check_temperature(start), _check_temperature(end)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1; got {steps!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0; got {step!r}")
    if kind not in SCHEDULES:
        raise ValueError(f"unknown annealing schedule {kind!r}; known: {', '.join(SCHEDULES)}")
    if kind == "constant":
        return start
    t = min(step, steps) / steps  # progress in [0, 1]
    if kind == "exponential":
        return start * (end / start) ** t
    if kind == "linear":
        return start + (end - start) * t
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


class TemperatureAnnealer:
    """Moves the ``temperature`` of gates along a schedule, one call of :meth:`step` per step.

    Every gate given must have a settable ``temperature`` (``HardConcreteGate``,
    ``GumbelSigmoidGate`` or a user's kind). The gates get ``temperature_at(0)`` at once.

    Args:
        gates: the gates to anneal (e.g. ``handle.gates.values()``).
        start, end, steps, kind: see :func:`temperature_at`.

    Raises:
        ValueError: a gate without a ``temperature``, or bad schedule options.
    """

    def __init__(self, gates: Iterable[Gate], *, start: float, end: float, steps: int,
                 kind: str = "exponential") -> None:
        self.gates = list(gates)
        for gate in self.gates:
            if not hasattr(gate, "temperature"):
                raise ValueError(f"{type(gate).__name__} has no temperature to anneal; "
                                 "pass only hard_concrete / gumbel_sigmoid gates")
        self.options = {"start": start, "end": end, "steps": steps, "kind": kind}
        self.step_count = 0
        self._apply()

    def temperature(self) -> float:
        """The temperature the gates have now (> 0)."""
        return temperature_at(self.step_count, **self.options)

    def _apply(self) -> None:
        value = self.temperature()
        for gate in self.gates:
            gate.temperature = value

    def step(self) -> float:
        """Advance one step, set every gate's temperature, and return it."""
        self.step_count += 1
        self._apply()
        return self.temperature()

    def state_dict(self) -> dict:
        """``{"step_count": int}`` (the schedule itself is given at construction)."""
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state["step_count"]`` and set the gates' temperature accordingly."""
        self.step_count = int(state["step_count"])
        self._apply()

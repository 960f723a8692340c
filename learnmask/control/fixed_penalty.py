"""Baseline controller: a constant-weight L0 penalty with no target (Louizos et al., 2018)."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from .lagrangian import _as_sparsity, _check_real, _check_state_keys, _check_step_count, logger

__all__ = ["FixedPenalty"]


class FixedPenalty:
    """Baseline: a fixed-weight L0 penalty ``weight * keep_ratio = weight * (1 - s)``.

    The classic L0 regulariser (Louizos et al., 2018, "Learning Sparse Neural Networks
    through L0 Regularization"): it always pushes toward more sparsity, with no target,
    so the final sparsity depends on ``weight`` and the task loss. Same interface as
    :class:`LagrangianController`; :meth:`step` only advances ``step_count``.

    Args:
        weight: penalty weight >= 0 (loss units per unit of keep ratio).

    Raises:
        ValueError: ``weight`` negative or not finite.
    """

    _STATE_KEYS = {"step_count"}

    def __init__(self, weight: float) -> None:
        self.weight = _check_real(weight, "weight", minimum=0.0)
        self.step_count = 0
        self._last: dict[str, float] = {"sparsity": math.nan, "penalty": math.nan}

    def penalty(self, s: Tensor | float) -> Tensor:
        """``weight * (1 - s)`` for the expected sparsity ``s`` (0-dim tensor in [0, 1]).

        Returns a zero tensor (no gradient), logging a warning, if ``s`` is NaN or inf.

        Raises:
            ValueError: ``s`` is not 0-dim, or is finite but outside [0, 1].
        """
        s, value = _as_sparsity(s)
        if not math.isfinite(value):
            logger.warning(
                "FixedPenalty.penalty: non-finite sparsity %r at step %d; "
                "returning a zero penalty", value, self.step_count,
            )
            self._last = {"sparsity": value, "penalty": 0.0}
            return s.detach().new_zeros(())
        self._last = {"sparsity": value, "penalty": self.weight * (1.0 - value)}
        return self.weight * (1.0 - s)

    def step(self) -> None:
        """Advance ``step_count`` by one; the weight is fixed."""
        self.step_count += 1

    def last_metrics(self) -> dict[str, float]:
        """``{"weight", "sparsity", "penalty"}`` from the last :meth:`penalty` call (NaN
        before the first)."""
        return {"weight": self.weight, **self._last}

    def state_dict(self) -> dict[str, int]:
        """``{"step_count": int}``; ``weight`` is configuration."""
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`.

        Raises:
            ValueError: missing or unknown keys, or ``step_count < 0``.
        """
        _check_state_keys(state, self._STATE_KEYS, type(self).__name__)
        self.step_count = _check_step_count(state["step_count"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight={self.weight}, step_count={self.step_count})"

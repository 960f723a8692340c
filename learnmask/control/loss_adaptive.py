"""Loss-adaptive control of a masking ratio (an MLM masking rate or a keep ratio).

Context: Ankner et al. (2023, "Dynamic Masking Rate Schedules for MLM Pretraining") show
that changing the MLM masking rate during training helps; they use fixed schedules.
:class:`LossAdaptiveController` closes the loop instead: it makes the task harder while
the training loss keeps falling below its running level and eases off when it rises.

For token gates (a keep ratio, ``harder="down"``): ``handle.tokens.keep_ratio =
controller.update(loss)`` each step, and a penalty controller built with
``target=handle.tokens.sparsity_target`` drives the expected keep ratio after it
(:attr:`learnmask.inject.tokens.TokenGates.keep_ratio`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from learnmask import distributed

from .lagrangian import _check_real, _check_state_keys, _check_step_count

__all__ = ["LossAdaptiveController"]

logger = logging.getLogger(__name__)

_DIRECTIONS = ("up", "down")


def _check_unit(value: object, name: str) -> float:
    value = _check_real(value, name)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] (a fraction of tokens/units); got {value!r}")
    return value


class LossAdaptiveController:
    """Move a ratio ``r`` in ``[r_min, r_max]`` by comparing the loss with its running level.

    Each :meth:`update` with a finite ``loss``:

    1. the first call only sets ``level = loss`` (nothing to compare with; ``r`` stays);
    2. later calls compare with the level *before* this loss: ``loss <= level +
       tolerance * |level|`` means the task is easy and ``r`` moves one ``max_step``
       toward "harder"; otherwise it moves one ``max_step`` toward "easier";
    3. ``r`` is clipped to ``[r_min, r_max]``;
    4. ``level = ema * level + (1 - ema) * loss``.

    "Harder" is ``harder="up"`` (larger ``r``: an MLM masking rate) or ``harder="down"``
    (smaller ``r``: a keep ratio). Every change of ``r`` is at most ``max_step``.

    A NaN/inf loss leaves ``r`` and the level unchanged and logs a warning.

    Args:
        ratio: initial ratio, in ``[r_min, r_max]``.
        r_min: lower bound, in [0, 1].
        r_max: upper bound, in [0, 1], >= ``r_min``.
        harder: ``"up"`` or ``"down"``, the direction that makes the task harder.
        ema: weight in (0, 1) of the old level in the running mean (``0.9``: ~10 steps).
        tolerance: relative slack >= 0: a loss up to ``level + tolerance * |level|`` still
            counts as easy.
        max_step: change of ``r`` per update, in (0, 1] (ratio units).

    Raises:
        ValueError: a bound or ratio outside [0, 1], ``r_min > r_max``, ``ratio``
            outside ``[r_min, r_max]``, ``ema`` outside (0, 1), ``tolerance < 0``,
            ``max_step`` outside (0, 1], or ``harder`` not "up"/"down".
    """

    _STATE_KEYS = {"ratio", "level", "num_updates"}

    def __init__(
        self,
        ratio: float,
        *,
        r_min: float = 0.0,
        r_max: float = 1.0,
        harder: str = "up",
        ema: float = 0.9,
        tolerance: float = 0.0,
        max_step: float = 0.01,
    ) -> None:
        self.r_min = _check_unit(r_min, "r_min")
        self.r_max = _check_unit(r_max, "r_max")
        if self.r_min > self.r_max:
            raise ValueError(f"r_min must be <= r_max; got r_min={self.r_min!r} > "
                             f"r_max={self.r_max!r}")
        ratio = _check_unit(ratio, "ratio")
        self._check_in_bounds(ratio)
        if harder not in _DIRECTIONS:
            raise ValueError(f"harder must be 'up' (e.g. an MLM masking rate) or 'down' "
                             f"(e.g. a keep ratio); got {harder!r}")
        self.harder = harder
        self.ema = _check_real(ema, "ema")
        if not 0.0 < self.ema < 1.0:
            raise ValueError(f"ema must be in (0, 1) (weight of the old level); got {self.ema!r}")
        self.tolerance = _check_real(tolerance, "tolerance", minimum=0.0)
        self.max_step = _check_real(max_step, "max_step", positive=True)
        if self.max_step > 1.0:
            raise ValueError(f"max_step must be in (0, 1] (ratio units); got {self.max_step!r}")
        self._ratio = ratio
        self.level: float | None = None
        self.num_updates = 0
        self._last: dict[str, float] = {"loss": math.nan, "delta": 0.0}

    def _check_in_bounds(self, ratio: float, r_max: float | None = None) -> None:
        r_max = self.r_max if r_max is None else r_max
        if not self.r_min <= ratio <= r_max:
            raise ValueError(f"ratio must be in [r_min, r_max] = [{self.r_min}, {r_max}]; "
                             f"got {ratio!r}")

    def _check_r_max(self, r_max: object) -> float:
        r_max = _check_unit(r_max, "r_max")
        if r_max < self.r_min:
            raise ValueError(f"r_max must be >= r_min = {self.r_min}; got {r_max!r}")
        return r_max

    @property
    def ratio(self) -> float:
        """The current ratio, in ``[r_min, r_max]``."""
        return self._ratio

    def cap(self, r_max: float) -> float:
        """Move the upper bound to ``r_max`` and clip the ratio to it; return the ratio. A
        schedule that must reach a ratio by a deadline lowers the bound as it goes (the token
        recipe's ``adaptive_within_ramp``: the linear ramp).

        Raises:
            ValueError: ``r_max`` outside ``[r_min, 1]`` or not finite.
            TypeError: ``r_max`` not a real number.
        """
        self.r_max = r_max = self._check_r_max(r_max)
        self._ratio = min(self._ratio, r_max)
        return self._ratio

    def update(self, loss: float) -> float:
        """Feed one training loss (any finite real) and return the new ratio.

        Under ``torch.distributed`` (two or more ranks) the loss is first averaged over ranks
        (:func:`learnmask.distributed.mean`), so every rank moves to the same ratio; every rank
        must call ``update`` at the same steps.
        """
        loss = distributed.mean(float(loss))
        if not math.isfinite(loss):
            logger.warning(
                "LossAdaptiveController.update: non-finite loss %r after %d updates; "
                "ratio (%r) and level (%r) left unchanged",
                loss, self.num_updates, self._ratio, self.level,
            )
            self._last = {"loss": loss, "delta": 0.0}
            return self._ratio
        delta = 0.0
        if self.level is None:
            self.level = loss
        else:
            easy = loss <= self.level + self.tolerance * abs(self.level)
            harder_sign = 1.0 if self.harder == "up" else -1.0
            step = self.max_step if easy else -self.max_step
            new = min(max(self._ratio + harder_sign * step, self.r_min), self.r_max)
            delta, self._ratio = new - self._ratio, new
            self.level = self.ema * self.level + (1.0 - self.ema) * loss
        self.num_updates += 1
        self._last = {"loss": loss, "delta": delta}
        return self._ratio

    def last_metrics(self) -> dict[str, float]:
        """``ratio`` (current), ``level`` (NaN before the first loss), ``loss`` and
        ``delta`` (the last change of ``ratio``) from the last :meth:`update`."""
        level = math.nan if self.level is None else self.level
        return {"ratio": self._ratio, "level": level, **self._last}

    def state_dict(self) -> dict[str, float | int | None]:
        """``{"ratio": float, "level": float | None, "num_updates": int, "r_max": float}``
        (``r_max`` because :meth:`cap` moves it); ``r_min``, ``harder``, ``ema``, ``tolerance``
        and ``max_step`` are configuration."""
        return {"ratio": self._ratio, "level": self.level, "num_updates": self.num_updates, "r_max": self.r_max}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` exactly.

        Raises:
            ValueError: missing or unknown keys, a ratio outside ``[r_min, r_max]``, a
                non-finite level or ``num_updates < 0``.
            TypeError: a value of the wrong type.
        """
        _check_state_keys({k: v for k, v in state.items() if k != "r_max"}, self._STATE_KEYS, type(self).__name__)
        # (states saved before cap() existed have no r_max: the configured bound stands)
        r_max = self._check_r_max(state["r_max"]) if "r_max" in state else self.r_max
        ratio = _check_unit(state["ratio"], "ratio")
        self._check_in_bounds(ratio, r_max)
        level = state["level"]
        if level is not None:
            level = _check_real(level, "level")
        try:
            num_updates = _check_step_count(state["num_updates"])
        except (TypeError, ValueError) as err:
            raise type(err)(str(err).replace("step_count", "num_updates")) from None
        self._ratio, self.level, self.num_updates, self.r_max = ratio, level, num_updates, r_max

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(ratio={self._ratio}, r_min={self.r_min}, "
            f"r_max={self.r_max}, harder={self.harder!r}, ema={self.ema}, "
            f"tolerance={self.tolerance}, max_step={self.max_step})"
        )

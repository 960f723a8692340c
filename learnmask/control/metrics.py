"""Control-quality metrics of a sparsity trajectory (overshoot, settling, tail error).

Standard step-response measures (Astrom & Murray, 2008, "Feedback Systems", sec. 5.3),
computed on logged per-step values of the measured sparsity ``s`` and the target ``t``
(both fractions in [0, 1]; ``sparsity = 1 - keep_ratio``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["control_metrics"]


def _as_floats(values: Sequence[float], name: str) -> list[float]:
    out = [float(v) for v in values]
    for i, v in enumerate(out):
        if not math.isfinite(v):
            raise ValueError(f"{name}[{i}] must be finite; got {v!r}")
    return out


def control_metrics(
    sparsity: Sequence[float],
    target: Sequence[float],
    *,
    tail_fraction: float = 0.2,
    band: float = 0.01,
) -> dict[str, Any]:
    """Quality of control of a trajectory ``s_0..s_{T}`` against targets ``t_0..t_{T}``.

    With ``e_k = s_k - t_k`` and the tail window the last ``ceil(tail_fraction * n)``
    steps (``n`` = number of steps, at least one step):

    * ``final_error`` (float >= 0): ``|e_T|``;
    * ``tail_max_error`` (float >= 0): ``max |e_k|`` over the tail;
    * ``settled`` (bool): ``tail_max_error <= band``;
    * ``overshoot`` (float >= 0): how far ``s`` went past the final target
      ``t_T`` after first reaching it, in the direction of approach. Approach from below
      (``s_0 < t_T``): ``max(s_k) - t_T`` over steps ``k`` from the first with
      ``s_k >= t_T``, clipped at 0; from above: ``t_T - min(s_k)`` likewise. 0 if ``s``
      never reaches ``t_T``. If ``s_0 == t_T`` there is no direction of approach and any
      excursion counts: ``max |s_k - t_T|``;
    * ``settling_step`` (int or None): the first step ``k`` such that ``|e_j| <= band``
      for every ``j >= k``; ``None`` if ``|e_T| > band``;
    * ``oscillation_amplitude`` (float >= 0): ``(max e - min e) / 2`` over the tail.

    Args:
        sparsity: measured sparsity per step, finite floats.
        target: target sparsity per step, same length.
        tail_fraction: fraction in (0, 1] of the final steps forming the tail window.
        band: tolerance >= 0 on ``|s - t|`` (sparsity units) for ``settled`` and
            ``settling_step``.

    Returns:
        The dict above, keys ``final_error``, ``tail_max_error``, ``settled``,
        ``overshoot``, ``settling_step``, ``oscillation_amplitude``.

    Raises:
        ValueError: empty input, different lengths, a non-finite value,
            ``tail_fraction`` outside (0, 1] or ``band < 0``.
    """
    s = _as_floats(sparsity, "sparsity")
    t = _as_floats(target, "target")
    if len(s) != len(t):
        raise ValueError(
            f"sparsity and target must have the same length (one value per step); "
            f"got {len(s)} and {len(t)}"
        )
    if not s:
        raise ValueError("sparsity and target are empty; expected at least one step")
    tail_fraction = float(tail_fraction)
    if not 0.0 < tail_fraction <= 1.0:
        raise ValueError(f"tail_fraction must be in (0, 1]; got {tail_fraction!r}")
    band = float(band)
    if not band >= 0.0:
        raise ValueError(f"band must be >= 0 (sparsity units); got {band!r}")

    n = len(s)
    errors = [a - b for a, b in zip(s, t)]
    tail = errors[n - max(1, math.ceil(tail_fraction * n)):]
    tail_max_error = max(abs(e) for e in tail)

    settling_step: int | None = None
    if abs(errors[-1]) <= band:
        settling_step = 0
        for k in range(n - 1, -1, -1):
            if abs(errors[k]) > band:
                settling_step = k + 1
                break

    return {
        "final_error": abs(errors[-1]),
        "tail_max_error": tail_max_error,
        "settled": tail_max_error <= band,
        "overshoot": _overshoot(s, t[-1]),
        "settling_step": settling_step,
        "oscillation_amplitude": (max(tail) - min(tail)) / 2.0,
    }


def _overshoot(s: list[float], final: float) -> float:
    if s[0] == final:
        return max(abs(v - final) for v in s)
    sign = 1.0 if s[0] < final else -1.0  # +1: approach from below
    for k, v in enumerate(s):
        if sign * (v - final) >= 0.0:
            return max(0.0, max(sign * (w - final) for w in s[k:]))
    return 0.0

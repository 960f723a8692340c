"""The parameter-mask fields of :class:`~learnmask.inject.config.MaskConfig` (``freeze``,
``weight_masks``, ``diff_masks``): each None (off) or a table, validated when the config is built.

A table holds selection keys (``layers``, ``pattern``, and from Python only ``predicate``; see
:func:`learnmask.params.select_parameters`) and, for the learnable masks, the options of
:func:`learnmask.params.apply_weight_masks` (piggyback, Mallya et al. 2018) or
:func:`learnmask.params.apply_diff_masks` (diff pruning, Guo, Rush & Kim 2021).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

#: The parameter-mask families a :class:`MaskConfig` can turn on, in the order they are applied.
PARAMETER_FAMILIES = ("freeze", "weight_masks", "diff_masks")
#: Keys that choose parameters, as ``select_parameters`` takes them.
SELECTORS = ("layers", "pattern", "predicate")
#: Per family: the option keys besides the selectors (passed to the family's ``apply_*``).
OPTIONS: dict[str, tuple[str, ...]] = {
    "freeze": (),
    "weight_masks": ("init", "threshold"),
    "diff_masks": ("init_log_alpha", "temperature", "stretch"),
}


def check_family(family: str, value: Any) -> dict[str, Any] | None:
    """``value`` as a validated table of ``family`` (a copy; lists become tuples), or None.

    Raises:
        ValueError: not a table; an unknown key (the message names the known ones); no
            selector; ``layers`` not an int or a non-empty list of ints; ``pattern`` not a str
            or a non-empty list of str; ``predicate`` not callable; an option that is not a
            finite number (``temperature`` > 0; ``stretch`` a pair (γ, ζ) with γ < 0 < 1 < ζ).
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"{family} must be a table of {', '.join(SELECTORS + OPTIONS[family])} (or None); "
                         f"got {type(value).__name__} {value!r}")
    known = SELECTORS + OPTIONS[family]
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))} in {family}; known: {', '.join(known)}")
    if not any(value.get(key) is not None for key in SELECTORS):
        raise ValueError(f"{family} needs at least one of layers, pattern, predicate to choose parameters; "
                         f"got {dict(value)!r}")
    table: dict[str, Any] = {}
    for key, item in value.items():
        if item is not None:
            table[key] = _CHECKS[key](f"{family}.{key}", item)
    return table


def _layers(where: str, value: Any) -> int | tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(i, int) and not isinstance(i, bool) for i in value):
        return tuple(value)
    raise ValueError(f"{where} must be a layer index or a non-empty list of them (ints; -1 = the top layer); "
                     f"got {value!r}")


def _pattern(where: str, value: Any) -> str | tuple[str, ...]:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(p, str) for p in value):
        return tuple(value)
    raise ValueError(f"{where} must be a glob over parameter names, 're:<regex>', or a non-empty list of them; "
                     f"got {value!r}")


def _predicate(where: str, value: Any) -> Callable:
    if not callable(value):
        raise ValueError(f"{where} must be a callable predicate(name, parameter) -> bool; got {value!r}")
    return value


def _finite(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number; got {value!r}")
    return float(value)


def _temperature(where: str, value: Any) -> float:
    value = _finite(where, value)
    if value <= 0:
        raise ValueError(f"{where} must be > 0; got {value!r}")
    return value


def _stretch(where: str, value: Any) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{where} must be a pair [gamma, zeta] with gamma < 0 < 1 < zeta; got {value!r}")
    gamma, zeta = (_finite(where, v) for v in value)
    if not gamma < 0.0 < 1.0 < zeta:
        raise ValueError(f"{where} must be a pair [gamma, zeta] with gamma < 0 < 1 < zeta; got {list(value)}")
    return gamma, zeta


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "layers": _layers, "pattern": _pattern, "predicate": _predicate, "init": _finite, "threshold": _finite,
    "init_log_alpha": _finite, "temperature": _temperature, "stretch": _stretch,
}

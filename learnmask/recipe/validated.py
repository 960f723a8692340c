"""The shared base of run configs: type checks (finite numbers only), construction from a mapping
that rejects unknown keys, and a stable key (a hash of the settings)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

# Fields added after results were first recorded. At their default they reproduce the earlier
# behaviour exactly, so key() leaves them out there and finished cells stay finished.
NEUTRAL_AT_DEFAULT = {"neutral_at_default": True}


def field_default(field: dataclasses.Field) -> Any:
    """A dataclass field's default value (calling its ``default_factory`` if it has one)."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def check_finite(name: str, value: Any) -> None:
    """Raise ValueError when ``value`` is a float that is NaN or infinite (the message names ``name``)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value}")


class ValidatedConfig:
    """Shared parts of the run configs (frozen dataclasses): type checks against each field's
    default, construction from a mapping that rejects unknown keys, and a stable key.

    Subclasses may set ``GRID_AXES``: fields whose value in a grid row may be a list, which
    expands into one cell per value (see :class:`learnmask.recipe.grid.GridConfig`).
    """

    GRID_AXES: tuple[str, ...] = ()

    def _check_types(self) -> None:
        """Each field has its default's type (an int is accepted for a float, and every float
        must be finite: NaN and ±inf are rejected); else ValueError."""
        for field in dataclasses.fields(self):
            value, default = getattr(self, field.name), field_default(field)
            if isinstance(default, tuple):
                ok = isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value)
                expected = "a list of strings"
            elif isinstance(default, dict):
                ok, expected = isinstance(value, Mapping), "a table (key = value pairs)"
            elif isinstance(default, float):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                expected = "a number"
                if ok:
                    check_finite(field.name, float(value))
                    object.__setattr__(self, field.name, float(value))
            else:
                bool_for_int = isinstance(value, bool) and not isinstance(default, bool)
                ok = isinstance(value, type(default)) and not bool_for_int
                expected = {int: "an integer", str: "a string", bool: "true or false"}.get(type(default),
                                                                                     type(default).__name__)
            if not ok:
                raise ValueError(f"{field.name} must be {expected}; got {type(value).__name__} {value!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, where: str = "config"):
        """Build from a mapping, rejecting unknown keys with the list of known ones.

        Raises:
            ValueError: an unknown key, a value of the wrong type, not finite or out of range;
                the message names ``where`` (the file, or the grid and row).
        """
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in {where}; known keys: {sorted(known)}")
        try:
            return cls(**values)
        except ValueError as error:
            raise ValueError(f"{error} (in {where})") from error

    def key(self) -> str:
        """Stable id of this run: a hash of every field (a changed setting is a new run).

        Fields marked neutral-at-default are left out while at their default, so adding an
        option does not orphan results recorded before it existed.
        """
        values = dataclasses.asdict(self)
        for field in dataclasses.fields(self):
            if field.metadata.get("neutral_at_default") and values[field.name] == field_default(field):
                del values[field.name]
        return self._hash(values)

    @staticmethod
    def _hash(values: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]

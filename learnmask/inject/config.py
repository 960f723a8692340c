"""What :func:`~learnmask.inject.apply_masks` gates, as a validated config (unknown keys rejected)."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

#: Granularities, in the order gates are built: one gate value per attention head ``(L, H)``,
#: per FFN intermediate unit ``(L, I)``, per hidden dimension ``(d,)``, per whole attention
#: block ``(L,)`` and per whole FFN block ``(L,)`` (CoFi pruning, Xia, Zhong & Chen 2022).
GRANULARITIES = ("heads", "ffn", "hidden", "attention_blocks", "ffn_blocks")


@dataclasses.dataclass(frozen=True)
class MaskConfig:
    """Which units of a model get gates, and which gate kind.

    Attributes:
        heads, ffn, hidden, attention_blocks, ffn_blocks: gate that granularity (bools; at
            least one must be on). Defaults: heads only.
        gate: registered gate kind for every granularity (``learnmask.gates.available_gates()``).
        gate_options: keyword options of that kind (e.g. ``{"init_keep_ratio": 0.9}``).
        target_modules: for models of no supported architecture: qualified names of the
            attention output projections whose input is the concatenation of the heads.
        num_heads: heads per block, with ``target_modules``.
        ffn_modules: for such models: qualified names of FFN down projections (units = their
            input features).

    Raises:
        ValueError: no granularity on, a non-bool flag, ``target_modules`` without
            ``num_heads``, or (in :meth:`from_dict`) an unknown key.
    """

    heads: bool = True
    ffn: bool = False
    hidden: bool = False
    attention_blocks: bool = False
    ffn_blocks: bool = False
    gate: str = "hard_concrete"
    gate_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    target_modules: tuple[str, ...] | None = None
    num_heads: int | None = None
    ffn_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in GRANULARITIES:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False; got {getattr(self, name)!r}")
        if not any(getattr(self, name) for name in GRANULARITIES):
            raise ValueError(f"nothing to gate: turn on at least one of {', '.join(GRANULARITIES)}")
        if not isinstance(self.gate, str):
            raise ValueError(f"gate must be a registered gate kind name; got {self.gate!r}")
        for name in ("target_modules", "ffn_modules"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"{name} must be a list of module names; got {value!r}")
                object.__setattr__(self, name, tuple(value))
        if self.target_modules and self.num_heads is None:
            raise ValueError("target_modules given without num_heads; pass num_heads=<heads per block>")
        object.__setattr__(self, "gate_options", dict(self.gate_options))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MaskConfig:
        """Build from a mapping (say, a TOML table); an unknown key is an error naming the known ones."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown mask config key(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
        return cls(**values)

    def granularities(self) -> tuple[str, ...]:
        """The granularities turned on, in :data:`GRANULARITIES` order."""
        return tuple(name for name in GRANULARITIES if getattr(self, name))

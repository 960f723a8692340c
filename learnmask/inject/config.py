"""What :func:`~learnmask.inject.apply_masks` gates, as a validated config (unknown keys rejected)."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

#: Granularities, in the order gates are built: one gate value per attention head ``(L, H)``,
#: per FFN intermediate unit ``(L, I)``, per hidden dimension ``(d,)``, per whole attention
#: block ``(L,)`` and per whole FFN block ``(L,)`` (CoFi pruning, Xia, Zhong & Chen 2022).
GRANULARITIES = ("heads", "ffn", "hidden", "attention_blocks", "ffn_blocks")
#: How gated attention blocks attend: see :class:`MaskConfig`'s ``attention``.
ATTENTION_MODES = ("auto", "op", "hooks")


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
        qkv_modules: with ``target_modules``, what ``finalize`` needs to remove heads: per
            layer, the names of the query, key and value projections (three names), or one name
            of a fused projection whose output rows are ``[q; k; v]`` (H D rows each).
        ffn_up_modules: with ``ffn_modules``, what ``finalize`` needs to remove FFN units: per
            layer, the names of the maps whose outputs are the units (one, or two for a gated
            MLP), or one name as a string.
        head_count_attribute: with ``qkv_modules``: the int attribute of the attention
            modules (each the parent of its output projection) holding the head count, which
            ``finalize`` sets to the heads kept where a module has it; None when every module
            reads the count from shapes.
        attention: how gated attention blocks attend. ``"auto"`` (default): Hugging Face models
            whose attention goes through transformers' attention interface (BERT, RoBERTa,
            DistilBERT, GPT-2, ViT, Llama) attend through :func:`learnmask.ops.masked_attention`
            with head gates fused; every other block keeps the model's own attention with gates
            by hooks (the handle's ``attention_paths`` says which and why). ``"op"``: the op for
            every gated block, an error naming why where it cannot be. ``"hooks"``: hooks only.
        backend: the op's backend for routed blocks (``"auto"`` or a registered name:
            ``"triton"``, ``"flex"``, ``"blocks"``, ``"sdpa"``, ``"reference"``).

    Raises:
        ValueError: no granularity on, a non-bool flag, ``target_modules`` without
            ``num_heads`` (or a ``num_heads`` that is not a positive int), projection lists that
            do not have one entry per layer, a module named twice, an unknown ``attention`` mode,
            a ``backend`` that is not a name, or (in :meth:`from_dict`) an unknown key.
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
    qkv_modules: tuple[tuple[str, ...], ...] | None = None
    ffn_up_modules: tuple[tuple[str, ...], ...] | None = None
    head_count_attribute: str | None = None
    attention: str = "auto"
    backend: str = "auto"

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
        if self.num_heads is not None and (isinstance(self.num_heads, bool) or not isinstance(self.num_heads, int)
                                           or self.num_heads < 1):
            raise ValueError(f"num_heads must be a positive int (heads per block); got {self.num_heads!r}")
        for name, base, sizes in (("qkv_modules", "target_modules", (1, 3)), ("ffn_up_modules", "ffn_modules", (1, 2))):
            value = getattr(self, name)
            if value is None:
                continue
            per_layer = _names_per_layer(name, value, sizes)
            if getattr(self, base) is None or len(per_layer) != len(getattr(self, base)):
                raise ValueError(f"{name} has {len(per_layer)} entries; expected one per name in {base} "
                                 f"({len(getattr(self, base) or ())})")
            object.__setattr__(self, name, per_layer)
        named = [n for field in ("target_modules", "ffn_modules") for n in (getattr(self, field) or ())]
        named += [n for field in ("qkv_modules", "ffn_up_modules")
                  for group in (getattr(self, field) or ()) for n in group]
        repeated = sorted({n for n in named if named.count(n) > 1})
        if repeated:
            raise ValueError(f"module name(s) {repeated} given more than once across target_modules, qkv_modules, "
                             "ffn_modules and ffn_up_modules; each module has one role in one layer")
        if self.head_count_attribute is not None and (not isinstance(self.head_count_attribute, str)
                                                      or self.qkv_modules is None):
            raise ValueError(f"head_count_attribute must be an attribute name given with qkv_modules; "
                             f"got {self.head_count_attribute!r}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {list(ATTENTION_MODES)}; got {self.attention!r}")
        if not isinstance(self.backend, str) or not self.backend:
            raise ValueError(f"backend must be 'auto' or a registered backend name; got {self.backend!r}")
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


def _names_per_layer(field: str, value: Any, sizes: tuple[int, ...]) -> tuple[tuple[str, ...], ...]:
    """``[["a", "b"], "c"]`` -> ``(("a", "b"), ("c",))``, each entry of one of ``sizes`` names."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{field} must be a list with one entry per layer; got {value!r}")
    out = []
    for entry in value:
        names = (entry,) if isinstance(entry, str) else entry
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names) \
                or len(names) not in sizes:
            raise ValueError(f"each entry of {field} must be {' or '.join(map(str, sizes))} module name(s); "
                             f"got {entry!r}")
        out.append(tuple(names))
    return tuple(out)

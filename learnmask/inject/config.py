"""What :func:`~learnmask.inject.apply_masks` gates, as a validated config (unknown keys rejected)."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from learnmask.inject.param_config import PARAMETER_FAMILIES, check_family

#: Granularities, in the order gates are built: one gate value per attention head ``(L, H)``,
#: per FFN intermediate unit ``(L, I)``, per hidden dimension ``(d,)``, per whole attention
#: block ``(L,)`` and per whole FFN block ``(L,)`` (CoFi pruning, Xia, Zhong & Chen 2022).
GRANULARITIES = ("heads", "ffn", "hidden", "attention_blocks", "ffn_blocks")
#: Per-example token gating (DynamicViT, Rao et al. 2021; LTP, Kim et al. 2022; PoWER-BERT,
#: Goyal et al. 2020): not a unit granularity (its gate values depend on the input), see
#: :mod:`learnmask.inject.tokens`.
TOKENS = "tokens"
#: How gated attention blocks attend: see :class:`MaskConfig`'s ``attention``.
ATTENTION_MODES = ("auto", "op", "hooks")


@dataclasses.dataclass(frozen=True)
class MaskConfig:
    """Which units of a model get gates, and which gate kind.

    Attributes:
        heads: gate each attention head (bool). Default None: True unless ``tokens`` or a
            parameter family (``freeze``, ``weight_masks``, ``diff_masks``) is on, so
            ``apply_masks(model)`` gates heads, ``apply_masks(model, ffn=True)`` heads and FFN
            units (as before), and ``apply_masks(model, freeze={...})`` gates nothing but
            freezes; pass ``heads=True`` to add heads to those. Resolved to a bool when built.
        ffn, hidden, attention_blocks, ffn_blocks: gate that granularity (bools). At least one
            granularity, ``tokens`` or a parameter family must be on.
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
        tokens: gate tokens per example (see :mod:`learnmask.inject.tokens`): after each layer
            in ``token_layers`` a scorer decides which tokens the later layers still see.
        token_layers: with ``tokens``: indices (0-based, into the model's transformer layers,
            strictly increasing) of the layers *after which* tokens are pruned; checked against
            the model's depth by ``apply_masks``.
        token_keep_ratio: with ``tokens``: fraction of each example's real tokens (the first,
            CLS-like token included) kept after the pruning layers, in (0, 1]. A float r is the
            fraction kept after the last pruning layer, reached geometrically: r^((i+1)/n)
            after pruning layer i of n (DynamicViT's ρ^s schedule); a list gives the fraction
            kept after each pruning layer (one per entry of ``token_layers``, non-increasing).
        token_gate: registered gate kind of the per-token decisions in training
            (``"hard_concrete"``, ``"gumbel_sigmoid"``, ``"threshold"`` or ``"topk"``).
        token_gate_options: keyword options of that kind (its ``temperature``, ``stretch``,
            ``hard``, ``threshold``; ``init_log_alpha`` / ``init_keep_ratio`` set the scorers'
            initial bias).
        freeze: None, or a table choosing parameters to freeze with
            :func:`learnmask.params.freeze` (gradient cleared, out of the optimizer once
            ``handle.attach_optimizer(optimizer)`` is called, norm statistics kept):
            ``{"layers": [0, 1], "pattern": "bert.embeddings.*"}``. Selection keys, as
            :func:`learnmask.params.select_parameters` takes them: ``layers`` (transformer layer
            indices, -1 = top), ``pattern`` (a glob over qualified parameter names,
            ``"re:<regex>"``, or a list of them), ``predicate`` (``f(name, parameter) -> bool``,
            from Python only); a parameter matching any of them is chosen.
        weight_masks: None, or a table of selection keys plus the options of
            :func:`learnmask.params.apply_weight_masks` (``init``, ``threshold``): piggyback
            weight masks (Mallya, Davis & Lazebnik 2018) on the chosen parameters.
        diff_masks: None, or a table of selection keys plus the options of
            :func:`learnmask.params.apply_diff_masks` (``init_log_alpha``, ``temperature``,
            ``stretch``): diff masks (Guo, Rush & Kim 2021) on the chosen parameters. A
            parameter chosen by both ``weight_masks`` and ``diff_masks`` is an error
            (``apply_masks`` names it).

    Raises:
        ValueError: nothing on (no granularity, tokens or parameter family), a non-bool flag,
            a parameter-family table that is not a table, has an unknown key (the known ones
            named), no selection key, or a bad value, ``tokens`` without ``token_layers`` (or
            layer indices that are not increasing non-negative ints), a ``token_keep_ratio``
            outside (0, 1] or a list of another length or increasing, ``target_modules`` without
            ``num_heads`` (or a ``num_heads`` that is not a positive int), projection lists that
            do not have one entry per layer, a module named twice, an unknown ``attention`` mode,
            a ``backend`` that is not a name, or (in :meth:`from_dict`) an unknown key.
    """

    heads: bool | None = None
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
    tokens: bool = False
    token_layers: tuple[int, ...] | None = None
    token_keep_ratio: float | tuple[float, ...] = 0.7
    token_gate: str = "hard_concrete"
    token_gate_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    freeze: Mapping[str, Any] | None = None
    weight_masks: Mapping[str, Any] | None = None
    diff_masks: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        for family in PARAMETER_FAMILIES:
            object.__setattr__(self, family, check_family(family, getattr(self, family)))
        if self.heads is None:
            object.__setattr__(self, "heads", not (self.tokens is True or self.parameter_families()))
        for name in (*GRANULARITIES, TOKENS):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False; got {getattr(self, name)!r}")
        if not any(getattr(self, name) for name in (*GRANULARITIES, TOKENS)) and not self.parameter_families():
            raise ValueError(f"nothing to gate: turn on at least one of {', '.join((*GRANULARITIES, TOKENS))}, "
                             f"or give one of {', '.join(PARAMETER_FAMILIES)}")
        _check_tokens(self)
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

    def parameter_families(self) -> tuple[str, ...]:
        """The parameter-mask families given, in :data:`PARAMETER_FAMILIES` order."""
        return tuple(name for name in PARAMETER_FAMILIES if getattr(self, name) is not None)


def _check_tokens(config: MaskConfig) -> None:
    """Validate (and normalise to tuples) the token fields of ``config``."""
    if not config.tokens:
        return
    layers = config.token_layers
    if layers is None:
        raise ValueError("tokens=True needs token_layers=[...]: the indices of the layers after which tokens "
                         "are pruned (e.g. [3] for after the fourth layer)")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = (layers,)
    if isinstance(layers, str) or not isinstance(layers, (list, tuple)) or not layers or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
        raise ValueError(f"token_layers must be a non-empty list of layer indices >= 0; got {config.token_layers!r}")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"token_layers must be strictly increasing; got {list(layers)}")
    ratio = config.token_keep_ratio
    ratios = tuple(ratio) if isinstance(ratio, (list, tuple)) else (ratio,)
    if not ratios or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and 0.0 < r <= 1.0
                             for r in ratios):
        raise ValueError(f"token_keep_ratio must be a fraction in (0, 1] (or a list of them); got {ratio!r}")
    if isinstance(ratio, (list, tuple)):
        if len(ratios) != len(layers):
            raise ValueError(f"token_keep_ratio has {len(ratios)} entries; expected one per token layer "
                             f"({len(layers)}: {list(layers)})")
        if any(b > a for a, b in zip(ratios, ratios[1:])):
            raise ValueError(f"token_keep_ratio must not increase from one pruning layer to the next (a token "
                             f"closed stays closed); got {list(ratios)}")
        ratio = tuple(float(r) for r in ratios)
    else:
        ratio = float(ratio)
    if not isinstance(config.token_gate, str):
        raise ValueError(f"token_gate must be a registered gate kind name; got {config.token_gate!r}")
    object.__setattr__(config, "token_layers", tuple(layers))
    object.__setattr__(config, "token_keep_ratio", ratio)
    object.__setattr__(config, "token_gate_options", dict(config.token_gate_options))


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

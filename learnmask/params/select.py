"""Selecting a model's parameters by transformer layer, name pattern or predicate.

One function, :func:`select_parameters`, used by freezing and by every parameter mask so that
"which parameters" means the same thing everywhere.
"""
from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence

from torch import nn

from learnmask.inject.architectures import find_layers

Predicate = Callable[[str, nn.Parameter], bool]


def select_parameters(model: nn.Module, *, layers: int | Sequence[int] | None = None,
                      pattern: str | Sequence[str] | None = None,
                      predicate: Predicate | None = None) -> dict[str, nn.Parameter]:
    """The parameters of ``model`` matching any criterion given, by qualified name in model order.

    Args:
        model: any module; ``layers`` needs transformer layers that
            :func:`learnmask.inject.architectures.find_layers` recognises (BERT, RoBERTa,
            DistilBERT, GPT-2, ViT, Llama, ``nn.TransformerEncoderLayer``).
        layers: transformer layer indices, 0 = the layer nearest the input; negative indices
            count from the end (-1 = the top layer). Selects every parameter inside the layer.
        pattern: a glob over qualified parameter names (``fnmatch``, case-sensitive:
            ``"encoder.layer.*.attention.*"``), or a regular expression written ``"re:<regex>"``
            (searched anywhere in the name: ``"re:layer\\.(0|1)\\."``), or a list of those.
        predicate: ``predicate(name, parameter) -> bool``.

    Returns:
        ``{qualified name: parameter}`` in ``model.named_parameters()`` order (a tied parameter
        once, under its first name). A parameter is selected when it matches any criterion.

    Raises:
        ValueError: no criterion given; a layer index out of range (the message names the depth);
            ``layers`` on a model without recognised transformer layers; an invalid regex; any
            single layer, pattern or the predicate matching no parameter (the message names the
            criterion, the model class and example parameter names).
    """
    if layers is None and pattern is None and predicate is None:
        raise ValueError("select_parameters needs at least one of layers=, pattern=, predicate=")
    named = dict(model.named_parameters())
    if not named:
        raise ValueError(f"{type(model).__name__} has no parameters to select")
    chosen: set[str] = set()
    if layers is not None:
        chosen |= _by_layers(model, named, layers)
    if pattern is not None:
        chosen |= _by_patterns(model, named, pattern)
    if predicate is not None:
        hits = {name for name, param in named.items() if predicate(name, param)}
        if not hits:
            raise ValueError(f"predicate {_callable_name(predicate)} matches no parameter of "
                             f"{type(model).__name__}; {describe_names(named)}")
        chosen |= hits
    return {name: param for name, param in named.items() if name in chosen}


def layer_parameter_names(model: nn.Module) -> list[list[str]]:
    """Qualified names of the parameters inside each transformer layer, layer 0 first.

    Raises:
        ValueError: no transformer layer recognised in ``model``.
    """
    specs = find_layers(model)
    if not specs:
        raise ValueError(f"no transformer layers found in {type(model).__name__}; select its parameters "
                         "with pattern= or predicate= instead")
    owner = {id(param): name for name, param in model.named_parameters()}
    return [[owner[id(p)] for p in spec.module.parameters() if id(p) in owner] for spec in specs]


def describe_names(names: Iterable[str], near: str | None = None, count: int = 3) -> str:
    """``"its parameters are named like 'a', 'b', 'c', ... (N in all)"``, with the names closest to
    ``near`` first when given (for error messages)."""
    names = list(names)
    shown = difflib.get_close_matches(near, names, n=count, cutoff=0.5) if near else []
    shown += [name for name in names if name not in shown][: count - len(shown)]
    listed = ", ".join(repr(name) for name in shown)
    more = f", ... ({len(names)} in all)" if len(names) > len(shown) else ""
    return f"its parameters are named like {listed}{more}"


def _by_layers(model: nn.Module, named: dict[str, nn.Parameter], layers: int | Sequence[int]) -> set[str]:
    indices = [layers] if isinstance(layers, int) else list(layers)
    if not indices:
        raise ValueError("layers=[] selects nothing; pass layer indices or leave layers=None")
    per_layer = layer_parameter_names(model)
    depth = len(per_layer)
    chosen: set[str] = set()
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"layer index {index!r} is not an integer")
        if not -depth <= index < depth:
            raise ValueError(f"layer {index} is out of range: {type(model).__name__} has {depth} transformer "
                             f"layers (indices {-depth}..{depth - 1})")
        names = per_layer[index]
        if not names:
            raise ValueError(f"layer {index} of {type(model).__name__} has no parameters left "
                             f"(emptied by finalize?); {describe_names(named)}")
        chosen.update(names)
    return chosen


def _by_patterns(model: nn.Module, named: dict[str, nn.Parameter], pattern: str | Sequence[str]) -> set[str]:
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    if not patterns:
        raise ValueError("pattern=[] selects nothing; pass patterns or leave pattern=None")
    chosen: set[str] = set()
    for one in patterns:
        if not isinstance(one, str):
            raise ValueError(f"pattern {one!r} is not a string (a glob, or 're:<regex>')")
        match = _matcher(one)
        hits = {name for name in named if match(name)}
        if not hits:
            near = one[3:] if one.startswith("re:") else one
            raise ValueError(f"pattern {one!r} matches no parameter of {type(model).__name__}; "
                             f"{describe_names(named, near=near)}")
        chosen |= hits
    return chosen


def _matcher(pattern: str) -> Callable[[str], bool]:
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:])
        except re.error as err:
            raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {err}") from err
        return lambda name: regex.search(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern)


def _callable_name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)

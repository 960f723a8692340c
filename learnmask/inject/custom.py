"""The layers of a model of no supported architecture, from the names a user gives
(``target_modules``, ``qkv_modules``, ``head_count_attribute``, ``ffn_modules``,
``ffn_up_modules`` of :class:`~learnmask.inject.config.MaskConfig`): each a
:class:`~learnmask.inject.architectures.LayerSpec` of arch ``"custom"``, its widths checked.

Legend: ``H`` heads per block, ``D`` head size, ``I`` FFN units.
"""
from __future__ import annotations

from torch import nn

from learnmask.inject.architectures import AttentionSpec, FFNSpec, LayerSpec, Rows, is_mha
from learnmask.inject.config import MaskConfig
from learnmask.inject.layout import in_features, is_linear_like, out_features

_HEAD_COUNT_NAMES = ("num_heads", "n_heads", "n_head", "num_attention_heads", "heads")


def _custom_attention(modules: dict[str, nn.Module], config: MaskConfig, row: int) -> AttentionSpec:
    """The attention spec of layer ``row`` of a model gated through ``target_modules``."""
    name, heads = config.target_modules[row], config.num_heads
    out = modules[name]
    width = in_features(out)
    if width % heads:
        raise ValueError(f"{name!r} has {width} input features, not divisible by num_heads={heads}")
    if config.qkv_modules is None:
        return AttentionSpec(None, "", None, None, None, out, heads, heads, width // heads)
    names = config.qkv_modules[row]
    projections = [modules[n] for n in names]
    if len(names) == 1:  # fused [q; k; v]
        rows = [Rows(projections[0], i * width) for i in range(3)]
        widths, expected = [out_features(projections[0])], [3 * width]
    else:
        rows = [Rows(module) for module in projections]
        widths, expected = [out_features(m) for m in projections], [width] * 3
    if widths != expected:
        raise ValueError(f"qkv_modules {list(names)} have {widths} output features; expected {expected} "
                         f"(the {width} inputs of {name!r}; grouped key/value heads are not supported here)")
    owner_name = name.rpartition(".")[0]
    owner, attribute = modules[owner_name], config.head_count_attribute
    counts = {a: getattr(owner, a) for a in _HEAD_COUNT_NAMES + ((attribute,) if attribute else ())
              if _is_count(getattr(owner, a, None))}
    where = f"{type(owner).__name__} {owner_name!r}"
    wrong = [(a, value) for a, value in counts.items() if value != heads]
    if wrong:
        raise ValueError(f"{where} has {wrong[0][0]} = {wrong[0][1]}, but num_heads={heads}; pass the module's "
                         "own head count")
    if attribute in counts:

        def set_heads(module, h, g):
            setattr(owner, attribute, h)
    else:  # this layer reads its head count from shapes, unless it holds one under another name
        stale = [a for a, value in counts.items() if value == heads]
        if stale:
            raise ValueError(f"{where} has {stale[0]} = {heads}, which finalize would leave stale; pass "
                             f"head_count_attribute={stale[0]!r}" +
                             (f" (it has no int attribute {attribute!r})" if attribute else ""))
        set_heads = None
    return AttentionSpec(None, "", *rows, out, heads, heads, width // heads, set_heads=set_heads)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _custom_ffn(modules: dict[str, nn.Module], config: MaskConfig, row: int) -> FFNSpec:
    down = modules[config.ffn_modules[row]]
    ups = [modules[n] for n in config.ffn_up_modules[row]] if config.ffn_up_modules else []
    for name, up in zip(config.ffn_up_modules[row] if ups else (), ups):
        if out_features(up) != in_features(down):
            raise ValueError(f"ffn_up_modules {name!r} has {out_features(up)} output features; expected the "
                             f"{in_features(down)} inputs of {config.ffn_modules[row]!r}")
    return FFNSpec(None, None, ups, down)


def custom_layers(model: nn.Module, config: MaskConfig) -> list[LayerSpec]:
    """The layers of a model gated through ``target_modules``/``ffn_modules`` (any model).

    Raises:
        ValueError: a name not in the model, lists of different lengths, widths that do not fit
            (heads, q/k/v, FFN up projections; the message names the module), or the output
            projection of an ``nn.MultiheadAttention`` (never called: a hook would gate nothing).
    """
    modules = dict(model.named_modules())
    names = (config.target_modules or ()) + (config.ffn_modules or ())
    for group in (config.qkv_modules or ()) + (config.ffn_up_modules or ()):
        names += group
    for name in config.target_modules or ():
        if is_mha(modules.get(name.rpartition(".")[0])):
            raise ValueError(f"{name!r} is the out_proj of an nn.MultiheadAttention, which uses its weight directly "
                             "(the module is never called), so a hook there would gate nothing; gate it without "
                             "target_modules: apply_masks(model, heads=True) gates it by a parametrization")
    for name in names:
        if name not in modules:
            raise ValueError(f"target module {name!r} not found in {type(model).__name__}")
        if not is_linear_like(modules[name]):
            raise ValueError(f"{name!r} is a {type(modules[name]).__name__}, not a linear map (nn.Linear or GPT-2's "
                             "Conv1D); target_modules, qkv_modules, ffn_modules and ffn_up_modules name linear maps")
    outs, downs = list(config.target_modules or ()), list(config.ffn_modules or ())
    if outs and downs and len(outs) != len(downs):
        raise ValueError(f"target_modules has {len(outs)} names and ffn_modules {len(downs)}; "
                         "give one of each per layer")
    attribute = config.head_count_attribute
    if attribute and not any(_is_count(getattr(modules[n.rpartition(".")[0]], attribute, None)) for n in outs):
        raise ValueError(f"head_count_attribute {attribute!r}: no attention module (the parent of a target module) "
                         "has an int attribute of that name")
    layers = []
    for row in range(max(len(outs), len(downs))):
        attention = _custom_attention(modules, config, row) if outs else None
        ffn = _custom_ffn(modules, config, row) if downs else None
        layers.append(LayerSpec(outs[row] if outs else downs[row], "custom", model, attention, ffn, []))
    return layers

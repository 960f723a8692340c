"""``apply_masks``: learnable gates on heads, FFN units, hidden dimensions and whole blocks of a
model as it is, by hooks, parametrizations and learnmask's attention function (never by forking
its classes). It returns a :class:`~learnmask.inject.handle.MaskHandle`.

Legend: ``L`` layers, ``H`` heads per layer, ``I`` FFN units per layer, ``d`` hidden size.
Gate shapes: heads ``(L, H)``, ffn ``(L, I)``, hidden ``(d,)``, attention_blocks and
ffn_blocks ``(L,)``. Token gates (``tokens=True``) have no fixed shape: their scorers give
``(B, S)`` keep values per forward pass (see :mod:`learnmask.inject.tokens`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from learnmask.gates import Gate, make_gate
from learnmask.inject.architectures import SUPPORTED, LayerSpec, find_layers
from learnmask.inject.config import MaskConfig
from learnmask.inject.custom import custom_layers
from learnmask.inject.handle import GATES_ATTRIBUTE, MaskHandle
from learnmask.inject.hidden import find_hidden_stream
from learnmask.inject.param_families import select_families
from learnmask.inject.tokens import TokenGates

__all__ = ["apply_masks"]


def _layers(model: nn.Module, config: MaskConfig) -> list[LayerSpec]:
    if config.target_modules or config.ffn_modules:
        return custom_layers(model, config)
    layers = find_layers(model)
    if not layers:
        raise ValueError(
            f"no attention blocks found in {type(model).__name__} (supported: {', '.join(SUPPORTED)}); "
            "pass target_modules=[...] (names of the attention output projections) with num_heads=..., "
            "and/or ffn_modules=[...] (names of the FFN down projections)")
    return layers


def _gate_shapes(model: nn.Module, layers: list[LayerSpec], config: MaskConfig) -> dict[str, tuple[int, ...]]:
    shapes, kind = {}, type(model).__name__
    for name in config.granularities():
        if name in ("heads", "attention_blocks"):
            found = [layer.attention for layer in layers if layer.attention is not None]
            if len(found) != len(layers):
                raise ValueError(f"{name} gating needs an attention block in every layer; {kind} has "
                                 f"{len(found)} in {len(layers)} layers")
            counts = sorted({a.num_heads for a in found})
            if len(counts) != 1:
                raise ValueError(f"layers have different head counts {counts}; gate them one layer at a time")
            shapes[name] = (len(layers), counts[0]) if name == "heads" else (len(layers),)
        elif name in ("ffn", "ffn_blocks"):
            found = [layer.ffn for layer in layers if layer.ffn is not None]
            if len(found) != len(layers):
                raise ValueError(f"{name} gating needs an FFN block in every layer; found {len(found)} in "
                                 f"{len(layers)} layers of {kind}")
            counts = sorted({f.units for f in found})
            if len(counts) != 1:
                raise ValueError(f"layers have different FFN widths {counts}; gate them one layer at a time")
            shapes[name] = (len(layers), counts[0]) if name == "ffn" else (len(layers),)
        else:
            shapes[name] = (layers[0].hidden_size,)
    return shapes


def apply_masks(model: nn.Module, config: MaskConfig | Mapping[str, Any] | None = None, *,
                gates: Mapping[str, Gate] | None = None, register: bool | None = None,
                **options: Any) -> MaskHandle:
    """Attach gates to the heads, FFN units, hidden dimensions and/or blocks of ``model``, and/or
    token gates (``tokens=True``, ``token_layers=[...]``, ``token_keep_ratio=r``) on
    BERT/RoBERTa/DistilBERT/ViT and ``nn.TransformerEncoderLayer`` stacks (DynamicViT, Rao et al.
    2021; LTP, Kim et al. 2022; PoWER-BERT, Goyal et al. 2020; see :mod:`learnmask.inject.tokens`),
    and/or parameter masks (``freeze={...}``, ``weight_masks={...}``, ``diff_masks={...}``; see
    :class:`MaskConfig` and :class:`~learnmask.inject.param_families.ParameterFamilies`). Heads
    are gated by default unless tokens or parameter masks are asked for (``heads=True`` adds them).

    Args:
        model: a supported architecture (``architectures.SUPPORTED``) or, with
            ``target_modules``/``ffn_modules``, any model; with parameter masks only, any
            ``nn.Module`` (``layers=`` selection still needs recognised transformer layers).
        config: a :class:`MaskConfig`, a mapping of its fields, or None; ``options`` (the same
            fields as keywords) override it.
        gates: ready-made gates by granularity name (e.g. ``{"heads": FixedGate(mask)}``),
            instead of building ``config.gate`` for them.
        register: register the gates on the model as ``learnmask_gates`` (default: yes, except
            for ``nn.Sequential``, which would call them as a layer).
        options: :class:`MaskConfig` fields, among them ``attention`` (``"auto"``: Hugging Face
            models attend through :func:`learnmask.ops.masked_attention`, other blocks by hooks;
            ``"op"``; ``"hooks"``) and ``backend`` (the op's backend).

    Returns:
        A :class:`MaskHandle`. Gates follow the model's mode (eval: deterministic masks); fully
        open gates leave the model's outputs unchanged; ``remove()`` undoes everything.
        Gate values are drawn at each forward of ``model`` itself; calling a submodule
        directly (``model.bert(...)``) reuses the last values: call the model you gated.

    Raises:
        ValueError: unknown config key or gate kind, unknown architecture (the message says what
            to pass), token gates on an architecture they do not support, a token layer index
            past the model's depth (``token_layers`` must leave a layer after the last), token
            gates where a Hugging Face layer cannot attend through the op, a gate whose shape is
            not the unit count, layers of unequal sizes, a model that already carries learnmask
            gates, ``attention="op"`` where a block cannot attend
            through the op (each reason named), an unknown backend name; a parameter selection
            that matches nothing (prefixed with its family: ``"freeze: pattern 'x' matches no
            parameter ..."``), a parameter chosen by both ``weight_masks`` and ``diff_masks``,
            or what :func:`learnmask.params.apply_weight_masks` / ``apply_diff_masks`` raise
            (tied weights, a non-float or 0-d parameter). On an error the model is left as it was.
        TypeError: a ready-made gate that is not a :class:`~learnmask.gates.Gate`.
    """
    if isinstance(config, Mapping) or config is None:
        config = MaskConfig.from_dict({**dict(config or {}), **options})
    elif options:
        config = MaskConfig.from_dict({**{f: getattr(config, f) for f in config.__dataclass_fields__}, **options})
    if hasattr(model, GATES_ATTRIBUTE):
        raise ValueError("model already has learnmask gates; call remove() on the first handle before applying again")
    chosen = select_families(model, config)  # before gates rename or add parameters
    layers = _layers(model, config) if config.granularities() or config.tokens else []
    shapes = _gate_shapes(model, layers, config)
    hidden = find_hidden_stream(model, layers) if config.hidden else None
    built = {}
    for name, shape in shapes.items():
        gate = (gates or {}).get(name)
        if gate is not None and not isinstance(gate, Gate):
            raise TypeError(f"{name} gate must be a learnmask Gate; got {type(gate).__name__}")
        if gate is None:
            gate = make_gate(config.gate, shape, **config.gate_options)
        elif tuple(gate.log_alpha.shape) != shape:
            raise ValueError(f"{name} gate has shape {tuple(gate.log_alpha.shape)}; "
                             f"expected {shape} for {type(model).__name__}")
        built[name] = gate
    unknown = sorted(set(gates or {}) - set(shapes))
    if unknown:
        raise ValueError(f"gates given for {unknown} but the config gates only {list(shapes)}")
    parameter = next(model.parameters(), None)
    for gate in built.values():
        if parameter is not None:
            gate.to(parameter.device)
        gate.train(model.training)
    if register is None:
        register = not isinstance(model, nn.Sequential)
    tokens = None
    if config.tokens:
        tokens = TokenGates(layers[0].hidden_size, config.token_layers, config.token_keep_ratio, config.token_gate,
                            config.token_gate_options)
        if parameter is not None:
            tokens.to(device=parameter.device, dtype=parameter.dtype)
        tokens.train(model.training)
    handle = MaskHandle(model, layers, built, config, hidden, register, tokens)
    try:
        handle._apply_families(config, chosen)
    except BaseException:
        handle.remove()
        raise
    return handle

"""The pruning record: which units of the original model a finalized model kept, layer by layer,
in the original model's indices, as plain JSON-ready data.

:func:`~learnmask.export.finalize` writes it on the model it returns (attribute
``learnmask_pruning``, a dict of ints, lists, strings and bools: it pickles and deep-copies with
the model and holds no learnmask object) and composes it when a pruned model is gated and
finalized again. :func:`~learnmask.export.save_pruned` writes it to ``pruning.json``;
:func:`~learnmask.export.load_pruned` turns it back into 0/1 masks (:func:`replay_masks`) and
runs finalize's own pruning on the original architecture.

A record::

    {"architecture": {...},                        # see learnmask.export.architecture
     "hidden": {"size": 32, "kept": [0, 2, ...]},  # kept: null = every hidden dimension
     "layers": [{"name": "bert.encoder.layer.0",
                 "attention": {"heads": 4, "kept": [1, 3], "bias": true},
                 "ffn": {"units": 64, "kept": [0, 5, ...], "bias": true}}, ...]}

``heads``/``units`` are the original counts; ``kept`` the increasing original indices kept
(query heads, padding of grouped-query attention included); ``bias`` whether a block whose
every unit was removed keeps its output bias (false when the block gate itself closed). A
layer without attention or FFN has ``null`` there. A model that cannot be rebuilt carries
``{"unsupported": "<why>"}`` instead.

Legend: ``H`` heads, ``I`` FFN units, ``d`` hidden size of the original model.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import Tensor, fx, nn

from learnmask.export import architecture
from learnmask.inject.architectures import LayerSpec, is_pruned_attention, is_stub

ATTRIBUTE = "learnmask_pruning"
_PRESERVED = getattr(fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes")


@dataclasses.dataclass
class LayerKept:
    """What one finalize kept of a layer, in that layer's indices before it: ``(kept, bias)``
    for its attention heads and its FFN units, or None where the layer was left whole."""

    attention: tuple[list[int], bool] | None
    ffn: tuple[list[int], bool] | None


@dataclasses.dataclass
class Kept:
    """What one finalize kept: hidden dims ``(k,)`` (None: all) and each layer's units."""

    hidden: Tensor | None
    layers: list[LayerKept]


def unsupported(reason: str) -> dict:
    """The record of a model that cannot be saved with ``save_pruned`` (``reason`` says why)."""
    return {"unsupported": reason}


def record_of(model: nn.Module) -> dict | None:
    """The record ``finalize`` left on ``model``, or None."""
    return getattr(model, ATTRIBUTE, None)


def attach(model: nn.Module, record: dict) -> None:
    """Put ``record`` on ``model`` (an fx module keeps it through ``copy.deepcopy`` too)."""
    setattr(model, ATTRIBUTE, record)
    if isinstance(model, fx.GraphModule):
        model.meta[_PRESERVED] = {**model.meta.get(_PRESERVED, {}), ATTRIBUTE: record}


def initial(model: nn.Module, layers: list[LayerSpec]) -> dict:
    """The record of an unpruned ``model``: every unit of every layer kept."""
    if any(is_stub(module) or is_pruned_attention(module) for module in model.modules()):
        return unsupported("it was pruned before without a record of what it kept (by an older learnmask?); "
                           "finalize the original model again")
    spec = architecture.describe(model)
    if isinstance(spec, str):
        return unsupported(spec)
    entries = []
    for layer in layers:
        att, ffn = layer.attention, layer.ffn
        entries.append({
            "name": layer.name,
            "attention": None if att is None else {"heads": att.num_heads, "kept": list(range(att.num_heads)),
                                                   "bias": True},
            "ffn": None if ffn is None else {"units": ffn.units, "kept": list(range(ffn.units)), "bias": True},
        })
    hidden = layers[0].hidden_size if layers else None
    return {"architecture": spec, "hidden": {"size": hidden, "kept": None}, "layers": entries}


def updated(record: dict, names: list[str], kept: Kept) -> dict:
    """``record`` after a finalize of the model it describes kept ``kept`` (composed indices)."""
    if "unsupported" in record:
        return record
    if names != [entry["name"] for entry in record["layers"]]:
        return unsupported(f"its layers {names} are not the recorded {[e['name'] for e in record['layers']]}")
    record = copy.deepcopy(record)
    if kept.hidden is not None:
        hidden = record["hidden"]
        before = hidden["kept"] if hidden["kept"] is not None else list(range(hidden["size"]))
        hidden["kept"] = [before[i] for i in kept.hidden.tolist()]
    for entry, layer in zip(record["layers"], kept.layers):
        for key, now in (("attention", layer.attention), ("ffn", layer.ffn)):
            if now is None or entry[key] is None:
                continue
            indices, bias = now
            entry[key]["kept"] = [entry[key]["kept"][i] for i in indices]
            entry[key]["bias"] = entry[key]["bias"] and bias
    return record


def _ones_at(size: int, kept: list[int]) -> Tensor:
    z = torch.zeros(size)
    z[torch.tensor(kept, dtype=torch.long)] = 1.0
    return z


def replay_masks(record: dict) -> dict[str, Tensor | list[Tensor]]:
    """0/1 masks that make finalize's pruning keep exactly what ``record`` says, on the original
    model: ``heads``/``ffn`` one ``(H,)``/``(I,)`` tensor per layer, ``attention_blocks``/
    ``ffn_blocks`` ``(L,)`` (0 where a block kept no unit and no bias), ``hidden`` ``(d,)``."""
    masks: dict[str, Tensor | list[Tensor]] = {}
    for key, units, block in (("attention", "heads", "attention_blocks"), ("ffn", "ffn", "ffn_blocks")):
        entries = [entry[key] for entry in record["layers"]]
        if any(entry is not None for entry in entries):
            count = "heads" if key == "attention" else "units"
            masks[units] = [torch.ones(1) if e is None else _ones_at(e[count], e["kept"]) for e in entries]
            masks[block] = torch.tensor([1.0 if e is None or e["bias"] else 0.0 for e in entries])
    hidden = record["hidden"]
    if hidden["kept"] is not None:
        masks["hidden"] = _ones_at(hidden["size"], hidden["kept"])
    return masks

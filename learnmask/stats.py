"""Parameter and FLOP accounting per layer for any model ``apply_masks`` understands, gated or
plain (dense or finalized); a gated model's own counts are its handle's
(``MaskHandle.remaining_parameters`` and friends).

Legend: ``L`` layers, ``H`` heads per layer.
"""
from __future__ import annotations

import dataclasses

import torch
from einops import rearrange
from torch import nn

from learnmask.inject.architectures import find_layers, is_mha
from learnmask.inject.costs import expected_layer_parameters, layer_costs, layer_flops
from learnmask.inject.handle import MaskHandle


def count_parameters(model: nn.Module, exclude: nn.Module | None = None) -> int:
    """Scalar parameters of ``model``, leaving out those of ``exclude`` (say, its gate)."""
    skip = {id(p) for p in exclude.parameters()} if exclude is not None else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


# ------------------------------------------------------------------ any granularity, any model


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """Size and cost of one transformer layer, gated (eval masks) or plain.

    Attributes:
        name: qualified name of the layer.
        heads, heads_total: query heads that compute / the layer had when found (kept heads
            under the eval masks for a gated model; what is there for a plain one).
        kv_groups: key/value heads in use (= heads without grouped-query attention).
        units, units_total: FFN units likewise.
        hidden: hidden dimensions kept (d).
        parameters: parameters of the layer once closed units are removed (exact for a plain
            model; from the unit costs for a gated one).
        flops_attention, flops_ffn: analytic forward FLOPs for one sequence of ``seq_len``
            tokens (see :func:`learnmask.inject.costs.layer_flops`); an ``nn.MultiheadAttention``
            with heads removed also counts the ``2 S (H' D)²`` of its query identity map
            (:mod:`learnmask.export.mha`), in a gated model too when finalize would make one.
    """

    name: str
    heads: int
    heads_total: int
    kv_groups: int
    units: int
    units_total: int
    hidden: int
    parameters: int
    flops_attention: float
    flops_ffn: float


def _layer_counts(layer, costs, masks: dict, row: int) -> tuple[dict, dict]:
    """(probabilities for the cost formula, kept counts for FLOPs) of one layer under ``masks``."""
    probs = {name: (mask[row] > 0).float() for name, mask in masks.items() if name != "hidden"}
    hidden = int((masks["hidden"] > 0).sum()) if "hidden" in masks else costs.hidden
    block = float(probs.get("attention_blocks", torch.ones(())))
    heads = probs["heads"] * block if "heads" in probs else torch.full((costs.num_heads,), block)
    if costs.num_kv_heads and costs.num_kv_heads != costs.num_heads:
        kv = int(rearrange(heads, "(g r) -> g r", g=costs.num_kv_heads).amax(dim=1).sum())
    else:
        kv = int(heads.sum())
    ffn_block = float(probs.get("ffn_blocks", torch.ones(())))
    units = probs["ffn"] * ffn_block if "ffn" in probs else torch.full((costs.units,), ffn_block)
    kept = {"heads": float(heads.sum()), "kv_groups": float(kv), "units": float(units.sum()), "hidden": float(hidden),
            "attention_block": 1.0, "ffn_block": 1.0}
    return probs, kept


def _query_identity_flops(layer, heads: float, seq_len: int) -> float:
    """FLOPs of the identity query map of a pruned ``nn.MultiheadAttention`` (0 elsewhere)."""
    att = layer.attention
    if att is None or heads == 0 or not is_mha(layer.attention_module) or (att.fused and heads == att.num_heads):
        return 0.0  # no such block now, nor after finalize (an untouched stock block stays as it is)
    return 2.0 * seq_len * (heads * att.head_dim) ** 2


def layer_report(target, *, seq_len: int) -> list[LayerReport]:
    """Per-layer parameters and FLOPs of a gated model (a ``MaskHandle``: its eval masks) or of a
    plain model (an ``nn.Module``, e.g. dense or finalized), for sequences of ``seq_len`` tokens.

    Raises:
        ValueError: a plain model with no supported transformer layers, or seq_len < 1.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1; got {seq_len!r}")
    if isinstance(target, MaskHandle):
        layers, masks = target.layers, target.eval_masks()
    else:
        layers, masks = find_layers(target), {}
        if not layers:
            raise ValueError(f"no supported transformer layers found in {type(target).__name__}")
    reports = []
    for row, layer in enumerate(layers):
        costs = layer_costs(layer)
        probs, kept = _layer_counts(layer, costs, masks, row)
        flops = layer_flops(costs, seq_len, kept)
        flops["attention"] += _query_identity_flops(layer, kept["heads"], seq_len)
        if masks:
            params = round(float(expected_layer_parameters(costs, kept["hidden"], probs)))
        else:
            params = count_parameters(layer.module)
        reports.append(LayerReport(layer.name, round(kept["heads"]), costs.num_heads, round(kept["kv_groups"]),
                                   round(kept["units"]), costs.units, round(kept["hidden"]), params,
                                   flops["attention"], flops["ffn"]))
    return reports


def total_flops(target, *, seq_len: int, batch_size: int = 1) -> float:
    """Forward FLOPs of all transformer layers for a batch of ``batch_size`` sequences of
    ``seq_len`` tokens (embeddings and task heads left out)."""
    return batch_size * sum(r.flops_attention + r.flops_ffn for r in layer_report(target, seq_len=seq_len))

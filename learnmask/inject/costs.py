"""How many parameters (and multiply-adds) each prunable unit of a layer owns.

Every count is linear in the number of hidden dimensions kept, ``d``: a unit owns
``a + b * d`` parameters (``a`` from biases, ``b`` from weight rows/columns of width d). With
per-unit keep probabilities from the gates this gives the expected remaining parameter count,
differentiable in the gate logits (the sparsity CoFi pruning constrains, Xia, Zhong & Chen 2022):

    E[params of a layer] = P(att) (Σ_h p_h c_head + Σ_g P(g alive) c_kv + c_att)
                           + P(ffn) (Σ_i q_i c_unit) + P(ffn)^[bias removable] c_ffn + c_stream

with independent gates, ``P(g alive) = 1 - Π_{h in g} (1 - p_h)`` for a key/value group g of
grouped-query attention, ``c_stream`` the layer's norms and the output biases its emptied blocks
(finalize's stubs) still add to the stream, and ``d`` replaced by its expectation
``Σ_j P(hidden dim j kept)``.

Legend: ``H`` query heads, ``G`` key/value groups, ``D`` head size, ``I`` FFN units, ``d``
hidden size, ``S`` sequence length.
"""
from __future__ import annotations

import dataclasses

import torch
from einops import rearrange
from torch import Tensor

from learnmask.inject.architectures import LayerSpec
from learnmask.inject.layout import in_features


@dataclasses.dataclass(frozen=True)
class Cost:
    """Parameters ``a + b * d`` of one unit; ``w`` of the ``b`` and ``v`` of the ``a`` are matmul
    weights (FLOPs; ``v``: rows reading another width, as an ``nn.MultiheadAttention`` with
    ``kdim``/``vdim``)."""

    a: float = 0.0
    b: float = 0.0
    w: float = 0.0
    v: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.a + other.a, self.b + other.b, self.w + other.w, self.v + other.v)

    def at(self, d):
        """Parameters at hidden size ``d`` (float or 0-dim tensor)."""
        return self.a + self.b * d


@dataclasses.dataclass(frozen=True)
class LayerCosts:
    """Per-unit parameter costs of one layer (see the module docstring)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    units: int
    hidden: int
    head: Cost
    kv_group: Cost
    attention: Cost
    unit: Cost
    ffn: Cost
    ffn_bias_removable: bool
    stream: Cost


def _bias(module) -> float:
    return 1.0 if getattr(module, "bias", None) is not None else 0.0


def _weight_rows(width: float, bias: float) -> Cost:
    """``width`` output rows of a map reading the d-wide stream (weights ``width * d``)."""
    return Cost(a=width * bias, b=width, w=width)


def _rows_reading(width: float, bias: float, inputs: int, d: int) -> Cost:
    """``width`` output rows of a map with ``inputs`` input features: the stream's when
    ``inputs == d``, else a fixed width (an attention's ``kdim``/``vdim``)."""
    if inputs == d:
        return _weight_rows(width, bias)
    return Cost(a=width * (inputs + bias), v=width * inputs)


def layer_costs(layer: LayerSpec) -> LayerCosts:
    """The :class:`LayerCosts` of ``layer`` from its modules' actual shapes."""
    att, ffn = layer.attention, layer.ffn
    d = layer.hidden_size
    head = kv = attention = Cost()
    heads = kv_heads = head_dim = 0
    if att is not None:
        heads, kv_heads, head_dim = att.num_heads, att.num_kv_heads, att.head_dim
        head = Cost(b=head_dim, w=head_dim)  # output-projection columns
        attention = Cost(b=_bias(att.out))
        if att.fused:  # a stock nn.MultiheadAttention (the model itself when att.owner is None)
            mha = layer.attention_module
            in_bias = 1.0 if mha.in_proj_bias is not None else 0.0
            head = head + _weight_rows(head_dim, in_bias) + _rows_reading(head_dim, in_bias, mha.kdim, d) \
                + _rows_reading(head_dim, in_bias, mha.vdim, d)
        elif att.q is not None:
            head = head + _weight_rows(head_dim, _bias(att.q.module))
            kv_cost = _rows_reading(head_dim, _bias(att.k.module), in_features(att.k.module), d) \
                + _rows_reading(head_dim, _bias(att.v.module), in_features(att.v.module), d)
            if kv_heads == heads:
                head = head + kv_cost
            else:
                kv = kv_cost
        if getattr(layer.attention_module, "bias_k", None) is not None:  # nn.MultiheadAttention(add_bias_kv=True)
            head = head + Cost(a=2 * head_dim)
    unit = ffn_cost = Cost()
    units = 0
    if ffn is not None:
        units = ffn.units
        unit = Cost(b=1, w=1)  # down-projection column
        for up in ffn.up:
            unit = unit + _weight_rows(1, _bias(up))
        ffn_cost = Cost(b=_bias(ffn.down))
    stream = Cost()  # d-wide tensors no gate of the layer removes: norms, emptied blocks' biases
    for module in layer.norms:
        count = sum(p.numel() for p in module.parameters(recurse=False))
        stream = stream + Cost(b=count / d)
    for stub in layer.stub_biases:
        stream = stream + Cost(b=stub.bias.numel() / d)
    return LayerCosts(heads, kv_heads, head_dim, units, d, head, kv, attention, unit, ffn_cost,
                      ffn.bias_removable if ffn is not None else True, stream)


def expected_layer_parameters(costs: LayerCosts, d, probs: dict[str, Tensor | None]) -> Tensor:
    """Expected parameters of one layer, differentiable in the probabilities.

    Args:
        costs: from :func:`layer_costs`.
        d: hidden dims kept (float or 0-dim tensor; its expectation when hidden is gated).
        probs: keep probabilities of this layer: ``heads`` ``(H,)``, ``ffn`` ``(I,)``,
            ``attention_blocks`` ``()``, ``ffn_blocks`` ``()``; None (or missing) = not gated.

    Returns:
        ``()`` float tensor >= 0.
    """
    one = torch.ones(())
    p_heads = probs.get("heads")
    p_att = probs.get("attention_blocks", None)
    p_att = one if p_att is None else p_att
    p_units = probs.get("ffn")
    p_ffn = probs.get("ffn_blocks", None)
    p_ffn = one if p_ffn is None else p_ffn
    heads = costs.num_heads * one if p_heads is None else p_heads.sum()
    attention = heads * costs.head.at(d) + costs.attention.at(d)
    if costs.kv_group != Cost():
        if p_heads is None:
            groups = costs.num_kv_heads * one
        else:
            per_group = rearrange(p_heads, "(g r) -> g r", g=costs.num_kv_heads)  # a group's heads are contiguous
            groups = (1 - torch.prod(1 - per_group, dim=1)).sum()
        attention = attention + groups * costs.kv_group.at(d)
    units = costs.units * one if p_units is None else p_units.sum()
    ffn = p_ffn * units * costs.unit.at(d)
    ffn_bias = (p_ffn if costs.ffn_bias_removable else one) * costs.ffn.at(d)
    return p_att * attention + ffn + ffn_bias + costs.stream.at(d)


def layer_flops(costs: LayerCosts, seq_len: int, kept: dict[str, float]) -> dict[str, float]:
    """Analytic forward FLOPs of one layer for one sequence of ``seq_len`` tokens.

    Counts 2 FLOPs per multiply-add of every matmul: the projections (2 S d per weight column
    of width d) and attention itself (``Q Kᵀ`` and ``softmax · V``: 4 S² D per query head).
    Norms, softmax, activations and biases are left out (a few percent at these sizes).

    Args:
        costs: from :func:`layer_costs`.
        seq_len: tokens S, int >= 1.
        kept: ``heads``, ``kv_groups``, ``units``, ``hidden`` (counts kept, possibly fractional
            expectations) and ``attention_block``, ``ffn_block`` (0 or 1).

    Returns:
        ``{"attention": FLOPs, "ffn": FLOPs}`` (floats).
    """
    s, d = float(seq_len), kept["hidden"]
    heads = kept["heads"] * kept["attention_block"]
    groups = kept["kv_groups"] * kept["attention_block"]
    attention = 2 * s * d * (heads * costs.head.w + groups * costs.kv_group.w) + 4 * s * s * heads * costs.head_dim
    attention += 2 * s * (heads * costs.head.v + groups * costs.kv_group.v)  # rows reading kdim/vdim
    ffn = 2 * s * d * kept["units"] * kept["ffn_block"] * costs.unit.w
    return {"attention": attention, "ffn": ffn}

"""``nn.MultiheadAttention`` with attention heads physically removed, as a plain ``torch.fx`` module.

The stock class ties its head count to the embedding width (``head_dim = embed_dim / num_heads``
and square q/k/v projections), so a block with H' < H heads cannot be one. What replaces it is a
``torch.fx.GraphModule`` (it pickles and loads with torch alone) that keeps the stock call
signature and return value and calls ``F.multi_head_attention_forward`` itself, so masks
(``attn_mask``, ``key_padding_mask``, ``is_causal``; boolean True = masked, or additive),
``need_weights``/``average_attn_weights``, unbatched inputs, ``bias_k``/``bias_v`` and
``add_zero_attn`` behave exactly as in ``nn.MultiheadAttention``.

Layout of the replacement: ``q_proj``, ``k_proj``, ``v_proj`` (modules holding ``weight``
``(H' D, E_in)`` and ``bias``), ``out_proj`` (``weight`` ``(E, H' D)``, ``bias``), attributes
``num_heads`` (H'), ``head_dim`` (D), ``embed_dim`` (H' D), ``batch_first``, plus
``in_proj_bias = None`` and ``_qkv_same_embed_dim = False`` so ``nn.TransformerEncoder(Layer)``
takes its ordinary (non-fused) path. Two differences from the
stock module, both documented in :func:`prune_heads`: the functional API wants a square query
projection, so the query is projected to H' D first and then passes an ``(H' D, H' D)``
identity (``q_identity``, a buffer; ``2 S (H' D)²`` extra FLOPs per sequence, counted by
:mod:`learnmask.stats`); attention-weight dropout is not applied (an inference module).

Legend: ``E`` the block's output (and query) width, ``E_in`` key/value input width (kdim/vdim),
``H``/``H'`` heads before/after, ``D`` head size, ``S`` sequence length.
"""
from __future__ import annotations

import inspect
import operator

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from learnmask.export import stubs
from learnmask.inject.architectures import is_pruned_attention
from learnmask.inject.layout import head_index

_SIGNATURE = (("query", inspect.Signature.empty), ("key", inspect.Signature.empty),
              ("value", inspect.Signature.empty), ("key_padding_mask", None), ("need_weights", True),
              ("attn_mask", None), ("average_attn_weights", True), ("is_causal", False))


def _projections(module: nn.Module) -> tuple[list[Tensor], list[Tensor | None]]:
    """``[W_q, W_k, W_v]`` ``(H D, E_in)`` and their biases of a stock or pruned block."""
    if is_pruned_attention(module):
        projections = (module.q_proj, module.k_proj, module.v_proj)
        return [p.weight for p in projections], [getattr(p, "bias", None) for p in projections]
    if module._qkv_same_embed_dim:
        weights = list(module.in_proj_weight.chunk(3))
    else:
        weights = [module.q_proj_weight, module.k_proj_weight, module.v_proj_weight]
    biases = list(module.in_proj_bias.chunk(3)) if module.in_proj_bias is not None else [None] * 3
    return weights, biases


def _projection(weight: Tensor, bias: Tensor | None) -> nn.Module:
    """A module holding ``weight`` ``(out, in)`` and ``bias`` ``(out,)`` (what fx keeps of an
    ``nn.Linear`` whose tensors a graph reads: the same holder after a deepcopy or a reload)."""
    holder = nn.Module()
    holder.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    holder.register_parameter("bias", None if bias is None else
                              nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad))
    return holder


def _graph(batch_first: bool, embed_dim: int, heads: int, biased: bool, bias_kv: bool,
           add_zero_attn: bool) -> fx.Graph:
    graph = fx.Graph()
    args = {name: graph.placeholder(name, default_value=default) for name, default in _SIGNATURE}

    def seq_first(x):  # (N, L, E) -> (L, N, E); an unbatched (L, E) input stays as it is
        return graph.call_method("transpose", (x, 0, -2)) if batch_first else x

    query = graph.call_function(F.linear, (seq_first(args["query"]), graph.get_attr("q_proj.weight"),
                                           graph.get_attr("q_proj.bias") if biased else None))
    in_bias = None
    if biased:  # the query bias was added by q_proj already
        zero = graph.call_function(torch.zeros_like, (graph.get_attr("q_proj.bias"),))
        in_bias = graph.call_function(torch.cat, ([zero, graph.get_attr("k_proj.bias"),
                                                   graph.get_attr("v_proj.bias")],))
    bias_k = graph.get_attr("bias_k") if bias_kv else None
    bias_v = graph.get_attr("bias_v") if bias_kv else None
    out_bias = graph.get_attr("out_proj.bias") if biased else None
    result = graph.call_function(
        F.multi_head_attention_forward,
        (query, seq_first(args["key"]), seq_first(args["value"]), embed_dim, heads, None, in_bias, bias_k, bias_v,
         add_zero_attn, 0.0, graph.get_attr("out_proj.weight"), out_bias),
        dict(training=False, key_padding_mask=args["key_padding_mask"], need_weights=args["need_weights"],
             attn_mask=args["attn_mask"], use_separate_proj_weight=True, q_proj_weight=graph.get_attr("q_identity"),
             k_proj_weight=graph.get_attr("k_proj.weight"), v_proj_weight=graph.get_attr("v_proj.weight"),
             average_attn_weights=args["average_attn_weights"], is_causal=args["is_causal"]))
    output = seq_first(graph.call_function(operator.getitem, (result, 0)))
    graph.output((output, graph.call_function(operator.getitem, (result, 1))))
    return graph


def prune_heads(module: nn.Module, heads: Tensor) -> fx.GraphModule:
    """An attention block computing exactly what ``module`` computes with only ``heads`` kept.

    Args:
        module: an ``nn.MultiheadAttention`` (any kdim/vdim, bias, ``add_bias_kv``,
            ``add_zero_attn``, ``batch_first``) or a block this function made before.
        heads: ``(H',)`` int64 indices of the heads to keep, increasing, 1 <= H' <= H. A gate
            value to bake in must already be in ``out_proj``'s input columns.

    Returns:
        A ``torch.fx.GraphModule`` with the stock forward signature, returning
        ``(output, weights)`` as ``nn.MultiheadAttention`` does (weights over the kept heads).
        Eval outputs equal ``module``'s with the other heads' output columns zeroed. It applies
        no attention-weight dropout, and its query passes one ``(H' D, H' D)`` identity map
        (the functional API's square query projection; see the module docstring).

    Raises:
        ValueError: ``heads`` empty, out of range or not increasing (a block with no head left
            is replaced by a stub instead, see :mod:`learnmask.export.stubs`).
    """
    total = module.num_heads
    if heads.dim() != 1 or len(heads) == 0 or int(heads.min()) < 0 or int(heads.max()) >= total \
            or bool((heads[1:] <= heads[:-1]).any()):
        raise ValueError(f"heads must be increasing indices in [0, {total}), at least one; got {heads.tolist()}")
    dim = module.head_dim
    index = head_index(heads.to(torch.long), dim).to(module.out_proj.weight.device)
    weights, biases = _projections(module)
    root = nn.Module()
    for name, weight, bias in zip(("q_proj", "k_proj", "v_proj"), weights, biases):
        setattr(root, name, _projection(weight[index], None if bias is None else bias[index]))
    out = module.out_proj
    out_bias = getattr(out, "bias", None)
    root.out_proj = _projection(out.weight[:, index], out_bias)
    root.register_buffer("q_identity", torch.eye(len(index), dtype=out.weight.dtype, device=out.weight.device))
    bias_kv = module.bias_k is not None
    if bias_kv:
        root.bias_k = nn.Parameter(module.bias_k.detach()[..., index].clone())
        root.bias_v = nn.Parameter(module.bias_v.detach()[..., index].clone())
    biased = biases[0] is not None
    if biased != (out_bias is not None):
        raise ValueError("q/k/v and out_proj disagree on having a bias; cannot rebuild this block")
    graph = _graph(module.batch_first, len(index), len(heads), biased, bias_kv, module.add_zero_attn)
    attributes = dict(num_heads=len(heads), head_dim=dim, embed_dim=len(index), batch_first=module.batch_first,
                      add_zero_attn=module.add_zero_attn, in_proj_bias=None, in_proj_weight=None,
                      _qkv_same_embed_dim=False)  # what nn.TransformerEncoder(Layer) and learnmask read
    if not bias_kv:
        attributes.update(bias_k=None, bias_v=None)
    return stubs.with_attributes(fx.GraphModule(root, graph, class_name="PrunedMultiheadAttention"), attributes)

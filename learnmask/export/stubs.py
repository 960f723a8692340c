"""Stand-ins for attention/FFN modules whose every unit was removed, built as ``torch.fx``
``GraphModule`` s so that a finalized model pickles and loads with torch and transformers only
(no learnmask class is referenced). Each accepts the replaced module's call signature
(``first_arg, *args, **kwargs``) and ignores everything but ``first_arg``.

Legend: ``x`` the block's input ``(..., d)``; ``b`` the baked output bias ``(d,)`` (a parameter,
or absent when the block was closed and its bias is zero).
"""
from __future__ import annotations

import torch
from torch import Tensor, fx, nn

_PRESERVED = getattr(fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes")


def _graph(first_arg: str) -> tuple[fx.Graph, fx.Node]:
    graph = fx.Graph()
    x = graph.placeholder(first_arg)
    graph.placeholder("*args")
    graph.placeholder("**kwargs")
    return graph, x


def _root(bias: Tensor | None, **modules: nn.Module) -> nn.Module:
    root = nn.Module()
    if bias is not None:
        root.bias = nn.Parameter(bias.detach().clone())
    for name, module in modules.items():
        setattr(root, name, module)
    return root


def zero_block(first_arg: str, bias: Tensor | None, *, returns_tuple: bool, class_name: str,
               attributes: dict | None = None) -> fx.GraphModule:
    """A block that adds nothing but its bias to the residual stream.

    Returns ``(zeros_like(x) + b, None)`` if ``returns_tuple`` (attention modules return
    ``(output, weights)``), else ``zeros_like(x) + b``; without a bias, zeros.

    Args:
        first_arg: name of the replaced module's first forward argument.
        bias: ``(d,)`` output bias to keep, or None.
        returns_tuple: the replaced module returns ``(output, attention weights)``.
        class_name: name shown in the model's repr (e.g. "RemovedAttention").
        attributes: plain attributes the caller's code reads from the replaced module (say,
            ``batch_first`` of an ``nn.MultiheadAttention``).
    """
    graph, x = _graph(first_arg)
    out = graph.call_function(torch.zeros_like, (x,))
    if bias is not None:
        out = graph.call_function(torch.add, (out, graph.get_attr("bias")))
    graph.output((out, None) if returns_tuple else out)
    return with_attributes(fx.GraphModule(_root(bias), graph, class_name=class_name), attributes or {})


def with_attributes(module: fx.GraphModule, attributes: dict) -> fx.GraphModule:
    """``module`` with plain ``attributes`` set so that they survive ``copy.deepcopy`` (fx keeps
    only what its graph reads, plus its user-preserved attributes) and pickling (fx restores
    extra attributes), and with its class name kept through pickling too."""
    attributes = {**attributes, "_graphmodule_cls_name": type(module).__name__}
    for name, value in attributes.items():
        setattr(module, name, value)
    module.meta[_PRESERVED] = attributes
    return module


def restore_class_names(model: nn.Module) -> None:
    """Give every fx module of ``model`` that :func:`with_attributes` built its own class name
    back (in place): ``GraphModule.__deepcopy__`` re-initialises a copy as "GraphModule", while
    pickling restores ``_graphmodule_cls_name``. Each fx module has a class of its own, so no
    other module is renamed."""
    for module in model.modules():
        name = getattr(module, "_graphmodule_cls_name", None)
        if isinstance(module, fx.GraphModule) and isinstance(name, str) and type(module).__name__ != name:
            type(module).__name__ = name


def post_norm_block(first_arg: str, norm: nn.Module, bias: Tensor | None, *, class_name: str) -> fx.GraphModule:
    """A post-norm attention block with no heads left (BERT family): ``(norm(x + b), None)``."""
    graph, x = _graph(first_arg)
    total = x if bias is None else graph.call_function(torch.add, (x, graph.get_attr("bias")))
    graph.output((graph.call_module("norm", (total,)), None))
    return with_attributes(fx.GraphModule(_root(bias, norm=norm), graph, class_name=class_name), {})

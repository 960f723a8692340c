"""Physically remove closed hidden (residual-stream) dimensions of a model, in place.

The gated model normalises over the kept dimensions only and multiplies every norm output by
the hidden gate z (``NormOverKept``). Baking z into each norm's weight and bias and slicing
every d-wide tensor to the kept dimensions gives the same numbers (CoFi, Xia et al. 2022).
Weights shared between modules (tied input/output embeddings: GPT-2's, Llama's, a masked-LM
decoder's) stay shared. A task head's map that writes d (a masked-LM head's ``dense``) loses
its closed output rows too, and its norm is baked like the stream's.

Legend: ``d`` hidden size, ``k`` dimensions kept; ``index`` ``(k,)`` positions kept.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from learnmask.inject.architectures import LayerSpec
from learnmask.inject.hidden import HiddenStream


class _Slicer:
    """Slices parameters along their d-wide dimension once each, so tied weights stay tied.

    ``done`` maps ``id(original)`` to ``(original, sliced)``: holding the original keeps its id
    from being reused by a tensor made later (a map sliced on both sides is sliced twice).
    """

    def __init__(self, index: Tensor) -> None:
        self.index, self.done = index, {}

    def slice(self, tensor: nn.Parameter, dim: int) -> nn.Parameter:
        key = id(tensor)
        if key not in self.done:
            kept = tensor.detach().index_select(dim, self.index.to(tensor.device)).clone()
            self.done[key] = (tensor, nn.Parameter(kept, requires_grad=tensor.requires_grad))
        return self.done[key][1]


def _linear_inputs(module: nn.Module, slicer: _Slicer) -> None:
    conv1d = type(module).__name__ == "Conv1D"
    module.weight = slicer.slice(module.weight, 0 if conv1d else 1)
    if conv1d:
        module.nx = module.weight.shape[0]
    else:
        module.in_features = module.weight.shape[1]


def _linear_outputs(module: nn.Module, slicer: _Slicer) -> None:
    conv1d = type(module).__name__ == "Conv1D"
    module.weight = slicer.slice(module.weight, 1 if conv1d else 0)
    if module.bias is not None:
        module.bias = slicer.slice(module.bias, 0)
    if conv1d:
        module.nf = module.weight.shape[1]
    else:
        module.out_features = module.weight.shape[0]


def _norm(module: nn.Module, z: Tensor, slicer: _Slicer) -> None:
    with torch.no_grad():
        module.weight.mul_(z.to(module.weight.dtype))
        if getattr(module, "bias", None) is not None:
            module.bias.mul_(z.to(module.bias.dtype))
    module.weight = slicer.slice(module.weight, 0)
    if getattr(module, "bias", None) is not None:
        module.bias = slicer.slice(module.bias, 0)
    if isinstance(module, nn.LayerNorm):
        module.normalized_shape = (module.weight.shape[0],)


def _embedding(owner: nn.Module, attr: str, slicer: _Slicer) -> None:
    value = getattr(owner, attr)
    if isinstance(value, nn.Embedding):
        value.weight = slicer.slice(value.weight, 1)
        value.embedding_dim = value.weight.shape[1]
    elif isinstance(value, nn.Conv2d):  # ViT patch projection: d output channels
        value.weight = slicer.slice(value.weight, 0)
        if value.bias is not None:
            value.bias = slicer.slice(value.bias, 0)
        value.out_channels = value.weight.shape[0]
    else:  # a raw parameter whose last dim is d (ViT cls_token, position_embeddings)
        setattr(owner, attr, slicer.slice(value, value.dim() - 1))


def prune_hidden(model: nn.Module, layers: list[LayerSpec], stream: HiddenStream, z: Tensor) -> None:
    """Bake the hidden gate ``z`` ``(d,)`` into the norms and remove the dims where z = 0.

    Every norm in ``stream.norms`` (the stream's and a head's) gets z baked into its weight and
    bias; maps reading d lose input columns, maps writing d (attention and FFN outputs, a head's
    ``stream.writers``) lose output rows, and so do the biases of emptied blocks' stubs; a map
    doing both is sliced both ways (CoFi, Xia et al. 2022).

    Raises:
        ValueError: every hidden dimension closed (a model needs at least one).
    """
    index = torch.nonzero(z > 0).flatten()
    if len(index) == 0:
        raise ValueError("every hidden dimension is closed; a model needs at least one")
    slicer = _Slicer(index)
    for norm in stream.norms:
        _norm(norm, z, slicer)
    for owner, attr in stream.embeddings:
        _embedding(owner, attr, slicer)
    readers, writers = [], []
    for layer in layers:
        att, ffn = layer.attention, layer.ffn
        if att is not None:
            readers += [att.q.module, att.k.module, att.v.module]
            writers.append(att.out)
        if ffn is not None:
            readers += ffn.up
            writers.append(ffn.down)
        for stub in layer.stub_biases:  # an emptied block still writes its bias (d,)
            stub.bias = slicer.slice(stub.bias, 0)
    seen = set()
    for module in readers + stream.readers:
        if id(module) not in seen:
            seen.add(id(module))
            _linear_inputs(module, slicer)
    for module in writers + stream.writers:  # after the inputs: a head's dense is in both
        _linear_outputs(module, slicer)
    _update_sizes(model, len(index))


def _update_sizes(model: nn.Module, kept: int) -> None:
    """Size attributes some forward passes read (DistilBERT's ``dim``); configs are left alone."""
    for module in model.modules():
        for attr in ("dim", "embed_dim"):
            if isinstance(getattr(module, attr, None), int) and type(module).__name__ in _SIZE_OWNERS:
                setattr(module, attr, kept)


_SIZE_OWNERS = ("DistilBertSelfAttention", "GPT2Attention")

"""Weight layouts of the modules learnmask gates and prunes: reading sizes, scaling and slicing
inputs/outputs of linear maps (``nn.Linear`` stores ``(out, in)``, GPT-2's ``Conv1D`` stores
``(in, out)``), embeddings and norms, in place and keeping each module's class.

Legend: ``in``/``out`` feature counts of a linear map; ``index`` a 1-D LongTensor of the
positions kept, in increasing order; ``scale`` a 1-D float tensor of one factor per position.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn


def bias_of(module: nn.Module) -> Tensor | None:
    """The bias of a linear map, or None (also when the module has no ``bias`` attribute at all, as
    the weight holders ``torch.fx`` keeps of a bias-free projection)."""
    return getattr(module, "bias", None)


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear map whose weight is stored ``(in, out)``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` (any subclass) or GPT-2's ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def in_features(module: nn.Module) -> int:
    """Input width of a linear map."""
    return module.weight.shape[0] if is_conv1d(module) else module.weight.shape[1]


def out_features(module: nn.Module) -> int:
    """Output width of a linear map."""
    return module.weight.shape[1] if is_conv1d(module) else module.weight.shape[0]


def weight_out_in(module: nn.Module) -> Tensor:
    """The weight of a linear map as ``(out, in)`` (a view, no copy)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def _parameter(value: Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(value.detach().clone().contiguous(), requires_grad=like.requires_grad)


def _sync_sizes(module: nn.Module) -> None:
    if is_conv1d(module):
        module.nx, module.nf = module.weight.shape
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape


@torch.no_grad()
def scale_inputs(module: nn.Module, scale: Tensor) -> None:
    """Multiply input column j of a linear map by ``scale[j]`` (``scale``: ``(in,)``)."""
    weight = weight_out_in(module)
    weight.mul_(scale.to(weight.dtype)[None, :])


@torch.no_grad()
def scale_outputs(module: nn.Module, scale: Tensor | float) -> None:
    """Multiply output row i (weight and bias) of a linear map by ``scale[i]`` or a scalar."""
    weight = weight_out_in(module)
    factor = torch.as_tensor(scale, dtype=weight.dtype, device=weight.device)
    weight.mul_(factor[:, None] if factor.dim() else factor)
    if bias_of(module) is not None:
        module.bias.mul_(factor)


def keep_outputs(module: nn.Module, index: Tensor) -> None:
    """Keep only output features ``index`` (weight rows and bias entries) of a linear map."""
    index = index.to(module.weight.device)
    weight = module.weight[:, index] if is_conv1d(module) else module.weight[index]
    module.weight = _parameter(weight, module.weight)
    if bias_of(module) is not None:
        module.bias = _parameter(module.bias[index], module.bias)
    _sync_sizes(module)


def keep_inputs(module: nn.Module, index: Tensor) -> None:
    """Keep only input features ``index`` (weight columns) of a linear map."""
    index = index.to(module.weight.device)
    weight = module.weight[index] if is_conv1d(module) else module.weight[:, index]
    module.weight = _parameter(weight, module.weight)
    _sync_sizes(module)


def drop_bias(module: nn.Module) -> None:
    """Remove the bias of an ``nn.Linear`` (a closed block's bias is zero and no longer needed)."""
    module.bias = None


def head_index(heads: Tensor, head_dim: int, offset: int = 0) -> Tensor:
    """Feature positions of ``heads`` (LongTensor of head numbers) when each spans ``head_dim``.

    Returns ``(len(heads) * head_dim,)`` positions ``offset + h * head_dim + d``.
    """
    d = torch.arange(head_dim, device=heads.device)
    return rearrange(offset + heads[:, None] * head_dim + d[None, :], "h d -> (h d)")

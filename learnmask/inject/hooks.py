"""The hooks and parametrizations by which :func:`~learnmask.inject.apply_masks` gates a model.

Each is a small object (not a closure) that holds its handle, so ``copy.deepcopy`` of a gated
model copies the handle with it and the copy gates itself with its own gates. Every hook reads
the gate values of the current forward pass from ``handle.current(name)``.

Legend: ``B`` batch, ``S`` sequence length, ``U`` units gated by one gate row (heads or FFN
units), ``D`` width of one unit (head size; 1 for FFN units), ``d`` hidden size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn
from torch.nn.utils import parametrize


class LearnmaskHook:
    """Base of every hook learnmask attaches (so a stripped copy can find and drop them)."""

    def __init__(self, handle, name: str, row: int | None = None) -> None:
        self.handle, self.name, self.row = handle, name, row

    def z(self) -> Tensor:
        """This hook's gate values for the current pass (a row of the gate, or all of it)."""
        z = self.handle.current(self.name)
        return z if self.row is None else z[self.row]


class SampleGates(LearnmaskHook):
    """Forward pre-hook on the model: one sample of every gate per forward pass."""

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if not self.handle.registered:  # gates kept off the model do not see model.eval()
            self.handle.gates.train(module.training)
            if self.handle.tokens is not None:
                self.handle.tokens.train(module.training)
        self.handle.sample()
        if self.handle.tokens is not None:
            self.handle.reset_tokens()


class ScaleInputUnits(LearnmaskHook):
    """Forward pre-hook on a linear map whose input is U units of width D: ``x * z`` per unit.

    Input ``(..., U * D)``; z ``(U,)`` in [0, 1]. Closing a unit zeroes its input columns, which
    is exactly removing it (heads: Michel et al. 2019; FFN units: CoFi, Xia et al. 2022).
    """

    def __init__(self, handle, name: str, row: int, unit_size: int) -> None:
        super().__init__(handle, name, row)
        self.unit_size = unit_size

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        hidden, *rest = args
        z = self.z().to(hidden.dtype)
        gated = rearrange(hidden, "... (u d) -> ... u d", d=self.unit_size) * rearrange(z, "u -> u 1")
        return (rearrange(gated, "... u d -> ... (u d)"), *rest)


class ScaleOutput(LearnmaskHook):
    """Forward hook on a block's last linear map: output (bias included) times the block's z.

    A whole attention or FFN block closed (z = 0) adds nothing to the residual stream (CoFi's
    ``mha_z`` / ``mlp_z``, Xia et al. 2022).
    """

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return output * self.z().to(output.dtype)


class NormOverKept(LearnmaskHook):
    """Forward hook on a residual-stream norm: normalise over the kept hidden dims only, times z.

    Input ``(..., d)``; z ``(d,)``. Dims with z = 0 neither enter the mean/variance nor leave
    the norm (CoFi's hidden-dimension mask, Xia et al. 2022), so physically removing them gives
    the same numbers. All-open (z = 1 everywhere) returns the norm's own output times 1.
    """

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        z = self.z().to(output.dtype)
        kept = z != 0
        if bool(kept.all()):
            return output * z
        x = args[0][..., kept]
        weight = module.weight[kept]
        if isinstance(module, nn.LayerNorm):
            bias = module.bias[kept] if module.bias is not None else None
            y = F.layer_norm(x, (x.shape[-1],), weight, bias, module.eps)
        else:  # RMSNorm (Llama's, or torch's): weight * x / sqrt(mean(x²) + eps), in float32
            eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", None) or 1e-6
            x32 = x.float()
            y = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
        out = torch.zeros_like(output)
        out[..., kept] = y.to(output.dtype)
        return out * z


class OutProjParametrization(nn.Module, LearnmaskHook):
    """Parametrization of ``nn.MultiheadAttention.out_proj.weight`` ``(d, H * D)``.

    ``nn.MultiheadAttention`` calls its output projection functionally, so a pre-hook would not
    fire; scaling the projection's input columns of head h by ``z_h`` (and everything by the
    block's z) is the same linear map as gating the head outputs.
    """

    def __init__(self, handle, row: int, head_dim: int, heads: bool, block: bool) -> None:
        nn.Module.__init__(self)
        self.__dict__["handle"] = handle  # a plain reference, not a submodule
        self.name, self.row, self.head_dim, self.heads, self.block = "heads", row, head_dim, heads, block

    def forward(self, weight: Tensor) -> Tensor:
        scale = torch.ones((), dtype=weight.dtype, device=weight.device)
        if self.heads:
            z = self.handle.current("heads")[self.row].to(weight.dtype)
            scale = repeat(z, "h -> 1 (h d)", d=self.head_dim)
        if self.block:
            scale = scale * self.handle.current("attention_blocks")[self.row].to(weight.dtype)
        return weight * scale


class BiasParametrization(nn.Module, LearnmaskHook):
    """Parametrization of ``out_proj.bias`` ``(d,)``: times the attention block's z."""

    def __init__(self, handle, row: int) -> None:
        nn.Module.__init__(self)
        self.__dict__["handle"] = handle
        self.name, self.row = "attention_blocks", row

    def forward(self, bias: Tensor) -> Tensor:
        return bias * self.handle.current("attention_blocks")[self.row].to(bias.dtype)


def parametrize_tensor(module: nn.Module, name: str, parametrization: nn.Module) -> None:
    """Register ``parametrization`` on ``module.<name>`` (unsafe: the shape is unchanged)."""
    parametrize.register_parametrization(module, name, parametrization, unsafe=True)


def strip(model: nn.Module) -> None:
    """Drop every learnmask hook, parametrization and attention route from ``model`` (in place).

    Parametrized tensors get their original values back (``leave_parametrized=False``), so the
    model is bit-identical to the one the hooks were put on; attention switched to learnmask's
    function goes back to ``"sdpa"`` (:func:`learnmask.inject.hf_attention.unroute`).
    """
    from learnmask.inject.hf_attention import unroute

    unroute(model)
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, hook in hooks.items() if isinstance(hook, LearnmaskHook)]:
                del hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for name in list(module.parametrizations.keys()):
            if any(isinstance(p, LearnmaskHook) for p in module.parametrizations[name]):
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)

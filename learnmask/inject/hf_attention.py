"""Hugging Face attention routed through learnmask's masked-attention op.

transformers 5 models call attention through a registry keyed by ``config._attn_implementation``
(``AttentionInterface``) and build their masks through a second one (``AttentionMaskInterface``).
learnmask registers one function in each under the name ``"learnmask"``:

- :func:`mask_function` receives the model's mask as transformers describes it — a ``mask_mod``
  predicate (``mask_function``), the 2-d padding ``attention_mask`` (1 = real token), offsets —
  and returns a learnmask :class:`~learnmask.masks.attention.AttentionMask` (keep convention:
  True = attend). Predicates transformers builds from known parts (causal, bidirectional,
  causal sliding window, their conjunctions) become structured masks, so block-sparse backends
  skip what they keep out; any other predicate is kept as it is (``from_mod``), which is exact
  but evaluated pair by pair. Registering only an attention function is not enough: a model
  whose mask interface has no entry for the implementation passes ``attention_mask=None`` and
  padding would be silently ignored.
- :func:`attention_forward` runs :func:`learnmask.ops.masked_attention` with the gates of the
  calling module (head gates fused as ``head_gate``), the model's attention-probability dropout
  (``dropout_p``) and the handle's backend, and returns the output in the layout transformers
  expects, ``(B, S, H, Dv)``. A module that carries no route (a part of the model that is not
  gated) attends through the same op without gates.

Which module is gated how is stored on the attention module itself as a plain attribute
(:data:`ROUTE_ATTRIBUTE`, never a submodule or a tensor: ``state_dict`` keys do not change), so a
``copy.deepcopy`` of a gated model carries its routes with it; :func:`unroute` takes it off.

Legend: ``B`` batch, ``H`` query heads, ``Hkv`` key/value heads, ``S`` query length, ``K`` key
length, ``D`` head size, ``Dv`` value head size.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from learnmask.masks import attention as am

logger = logging.getLogger(__name__)

#: The name under which learnmask's attention and mask functions are registered in transformers.
NAME = "learnmask"
#: Attribute of a routed attention module holding its :class:`Route`.
ROUTE_ATTRIBUTE = "learnmask_route"
# Where each supported architecture's layer keeps the module that calls the attention interface.
_ATTENTION_PATHS = {"bert": "attention.self", "distilbert": "attention", "gpt2": "attn", "vit": "attention",
                    "llama": "self_attn"}


@dataclasses.dataclass(frozen=True)
class AttentionPath:
    """How one gated layer attends.

    Attributes:
        path: ``"op"`` (through :func:`learnmask.ops.masked_attention`, gates fused) or
            ``"hooks"`` (the model's own attention, gates by hooks/parametrizations).
        reason: why the hook path was taken (empty for ``"op"``).
    """

    path: str
    reason: str = ""


class Route:
    """What :func:`attention_forward` needs to gate one attention module: its handle and row.

    Reads the handle's gate values of the current forward pass (``handle.current``) and its
    ``backend`` at every call, so a gate swapped by ``set_gate`` or a new backend takes effect at
    once.
    """

    def __init__(self, handle, row: int) -> None:
        self.handle, self.row = handle, row

    def head_gate(self) -> Tensor | None:
        """``(H,)`` gate values of this module's heads for the current pass, or None."""
        if "heads" not in self.handle.gates:
            return None
        return self.handle.current("heads")[self.row]

    def token_inputs(self, mask, batch: int, kv_len: int, device) -> tuple[Any, Tensor | None]:
        """``(mask, token_gate)`` for this module under the handle's token gates.

        Up to the first pruning layer: the model's mask, no gate (the real tokens are read off
        the mask here). After it: the model's mask and the keep values ``(B, K)`` as
        ``token_gate`` (training, ``"mask"`` mode), or, once the tokens are gathered
        (``"drop"``), a padding mask of the gathered length ``K`` and no gate.
        """
        tokens = self.handle.tokens
        if tokens is None:
            return mask, None
        state = self.handle.token_state
        if self.row <= tokens.layers[0]:
            state.observe(real_keys(mask, batch, kv_len, device))
            return mask, None
        if state.dropped:
            return (None if bool(state.valid.all()) else am.padding(state.valid)), None
        return mask, state.keep


def _transformers_interfaces():
    """``(AttentionInterface, AttentionMaskInterface)`` of the installed transformers, or a reason."""
    try:
        from transformers.masking_utils import AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface
    except ImportError as error:
        return None, f"transformers has no attention-mask interface here ({error}); transformers >= 5 has"
    return (AttentionInterface, AttentionMaskInterface), ""


def register() -> None:
    """Register :func:`attention_forward` and :func:`mask_function` in transformers (idempotent).

    Raises:
        ImportError: transformers without the attention and mask interfaces (older than 5).
    """
    interfaces, reason = _transformers_interfaces()
    if interfaces is None:
        raise ImportError(reason)
    attention, masks = interfaces
    if attention._global_mapping.get(NAME) is not attention_forward:
        attention.register(NAME, attention_forward)
    if masks._global_mapping.get(NAME) is not mask_function:
        masks.register(NAME, mask_function)


def attention_module(layer) -> nn.Module | None:
    """The module of ``layer`` (a :class:`~learnmask.inject.architectures.LayerSpec`) that calls
    transformers' attention interface, or None where its architecture has none."""
    path = _ATTENTION_PATHS.get(layer.arch)
    if path is None or layer.attention is None:
        return None
    module = layer.module
    for part in path.split("."):
        module = getattr(module, part, None)
    return module


def route_reason(model: nn.Module, layer) -> str:
    """Why ``layer`` cannot attend through the op (empty string: it can)."""
    if layer.attention is None:
        return "the layer has no attention block"
    if layer.arch == "custom":
        return "the model is gated through target_modules; learnmask does not know how its attention is computed"
    if layer.arch in ("multihead_attention", "transformer_encoder_layer"):
        return "nn.MultiheadAttention computes attention inside torch (F.multi_head_attention_forward)"
    module = attention_module(layer)
    if module is None:
        return f"no attention module at {layer.name}.{_ATTENTION_PATHS.get(layer.arch, '?')}"
    config = getattr(module, "config", None)
    if not hasattr(config, "_attn_implementation"):
        return f"{type(module).__name__} has no Hugging Face config (no attention-function interface)"
    interfaces, reason = _transformers_interfaces()
    if interfaces is None:
        return reason
    if getattr(module, "reorder_and_upcast_attn", False) and config._attn_implementation == "eager":
        return "GPT-2 with reorder_and_upcast_attn computes its own upcast attention under eager"
    return ""


def attention_paths(model: nn.Module, layers: list, mode: str) -> dict[str, AttentionPath]:
    """How each layer with an attention block attends (see ``MaskConfig.attention``).

    Raises:
        ValueError: ``mode == "op"`` and some layer cannot attend through the op (the reasons).
    """
    paths = {}
    for layer in layers:
        if layer.attention is None:
            continue
        reason = "attention='hooks' was asked for" if mode == "hooks" else route_reason(model, layer)
        paths[layer.name] = AttentionPath("hooks", reason) if reason else AttentionPath("op")
    refused = {name: path.reason for name, path in paths.items() if path.path == "hooks"}
    if mode == "op" and refused:
        lines = "\n".join(f"  {name}: {reason}" for name, reason in refused.items())
        raise ValueError(f"attention='op': these attention blocks of {type(model).__name__} cannot attend through "
                         f"learnmask's masked-attention op:\n{lines}\nuse attention='auto' to gate them by hooks")
    return paths


def check_backend(backend):
    """``backend`` if it is ``"auto"``, a registered backend's name or a backend object.

    Raises:
        ValueError: an unknown name (the op's own message lists the known ones).
        TypeError: neither a name nor an ``AttentionBackend``.
    """
    from learnmask.ops import AttentionBackend, get_backend

    if isinstance(backend, str):
        if backend != "auto":
            get_backend(backend)
        return backend
    if not isinstance(backend, AttentionBackend):
        raise TypeError(f"backend must be 'auto', a registered backend name or an AttentionBackend; got {backend!r}")
    return backend


def configs_of(model: nn.Module, modules: list[nn.Module]) -> list[Any]:
    """The distinct Hugging Face configs that decide how ``modules`` attend and how their masks are
    built: each module's own and those of the modules above it that hold one."""
    names = {id(m): name for name, m in model.named_modules()}
    found: dict[int, Any] = {}
    for module in modules:
        name = names.get(id(module), "")
        parts = name.split(".") if name else []
        for depth in range(len(parts) + 1):
            holder = model.get_submodule(".".join(parts[:depth]))
            config = getattr(holder, "config", None)
            if hasattr(config, "_attn_implementation"):
                found.setdefault(id(config), config)
    return list(found.values())


class Switch:
    """Attention modules routed through the op and their configs switched to :data:`NAME`;
    :meth:`remove` puts every config's own implementation back and takes the routes off."""

    def __init__(self, routes: dict[nn.Module, Route], configs: list[Any]) -> None:
        register()
        self.routes = routes
        self.saved = [(config, config._attn_implementation) for config in configs]
        for module, route in routes.items():
            module.__dict__[ROUTE_ATTRIBUTE] = route
        for config, _ in self.saved:
            _set_implementation(config, NAME)

    def remove(self) -> None:
        for config, implementation in self.saved:
            _set_implementation(config, implementation)
        for module in self.routes:
            module.__dict__.pop(ROUTE_ATTRIBUTE, None)
        self.saved, self.routes = [], {}


def _set_implementation(config, implementation: str | None) -> None:
    # the internal attribute: the public setter would also rewrite sub-configs we did not switch
    if hasattr(config, "_attn_implementation_internal"):
        config._attn_implementation_internal = implementation
    else:
        config._attn_implementation = implementation


def unroute(model: nn.Module) -> None:
    """Take every route off ``model``'s modules and switch configs left at :data:`NAME` back to
    ``"sdpa"`` (for a copy of a gated model made without its handle)."""
    for module in model.modules():
        module.__dict__.pop(ROUTE_ATTRIBUTE, None)
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) == NAME:
            _set_implementation(config, "sdpa")


# -- the two functions transformers calls --------------------------------------------------------

def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                      dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                      **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function signature, computed by :func:`learnmask.ops.masked_attention`.

    Args:
        module: the calling attention module (its :class:`Route`, if any, gives the head gate).
        query: ``(B, H, S, D)``; key: ``(B, Hkv, K, D)``; value: ``(B, Hkv, K, Dv)``.
        attention_mask: what :func:`mask_function` returned (an ``AttentionMask`` or None), or a
            4-d mask a caller prepared itself (bool keep-mask or additive ``finfo.min`` bias).
        dropout: attention-probability dropout, in [0, 1) (0 in eval, as transformers passes it).
        scaling: score scale (default ``1/sqrt(D)``).
        is_causal: used only when no mask was built (a causal module with ``attention_mask=None``).

    Returns:
        ``((B, S, H, Dv) output, None)``: learnmask computes no attention weights.

    Raises:
        ValueError: an argument the op cannot honour (``softcap``, ``position_bias``, sinks).
        learnmask.ops.BackendNotSupported: the handle's backend refuses the inputs (with reasons).
    """
    from learnmask.ops import masked_attention

    for unsupported in ("softcap", "position_bias", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"learnmask's attention does not support {unsupported!r}; remove the gates "
                             "(handle.remove()) or apply_masks(..., attention='hooks') for this model")
    if kwargs.get("output_attentions"):
        logger.warning("learnmask's attention returns no attention weights (output_attentions is ignored)")
    route = module.__dict__.get(ROUTE_ATTRIBUTE)
    mask = attention_mask
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    if mask is None and causal and query.shape[2] > 1:
        mask = am.causal()
    options: dict[str, Any] = {"scale": scaling, "dropout_p": float(dropout)}
    if route is not None:
        options.update(head_gate=route.head_gate(), backend=route.handle.backend)
        mask, options["token_gate"] = route.token_inputs(mask, query.shape[0], key.shape[2], query.device)
    out = masked_attention(query, key, value, mask=mask, **options)
    return rearrange(out, "b h s d -> b s h d").contiguous(), None


def mask_function(batch_size: int, q_length: int, kv_length: int, q_offset: int | Tensor = 0,
                  kv_offset: int | Tensor = 0, mask_function: Callable | None = None,
                  attention_mask: Tensor | None = None, **kwargs) -> am.AttentionMask | None:
    """transformers' mask-function signature, returning a learnmask ``AttentionMask`` (or None).

    Args:
        batch_size, q_length, kv_length: sizes of the attention call (B, S, K).
        q_offset, kv_offset: absolute position of the first query / key (a KV cache).
        mask_function: transformers' ``mask_mod(batch_idx, head_idx, q_idx, kv_idx)`` (True = attend).
        attention_mask: ``(B, >= kv_offset + K)`` bool/0-1, 1 = real token (padding on the right
            of a shorter mask counts as padding, as in transformers).

    Returns:
        The mask, structured where its parts are known; None when nothing is masked.
    """
    from transformers import masking_utils as mu

    offset = _nonzero(q_offset) or _nonzero(kv_offset)
    mask = False if offset else _known(mask_function, mu)
    if mask is False:  # an unknown predicate, or positions shifted by a cache: exact, pair by pair
        inner = mask_function

        def shifted(b, h, q_idx, kv_idx):
            return inner(b, h, q_idx + q_offset, kv_idx + kv_offset)

        mask = am.from_mod(shifted if offset else inner, name=getattr(inner, "__name__", "hf_mask"),
                           per_batch=True, per_head=False)
    if attention_mask is not None:
        padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        padding = padding[:, _int(kv_offset):_int(kv_offset) + kv_length].to(torch.bool)
        if not bool(padding.all()):
            keys = am.padding(padding)
            mask = keys if mask is None else mask & keys
    return mask


def _known(fn: Callable | None, mu) -> am.AttentionMask | None | bool:
    """The learnmask mask of a predicate transformers builds from known parts: None for
    "everything", False when it is not recognised."""
    if fn is None or fn is mu.bidirectional_mask_function:
        return None
    if fn is mu.causal_mask_function:
        return am.causal()
    if getattr(fn, "__qualname__", "") == "and_masks.<locals>.and_mask" and fn.__closure__:
        parts = fn.__closure__[0].cell_contents
        causal = mu.causal_mask_function in parts
        windows = [_window_of(p) for p in parts if p is not mu.causal_mask_function
                   and p is not mu.bidirectional_mask_function]
        if any(w is None for w in windows) or (windows and not causal):
            return False
        if windows:
            return am.sliding_window(min(windows))
        return am.causal() if causal else None
    return False


def _window_of(fn: Callable) -> int | None:
    """W of transformers' ``sliding_window_overlay(W)`` (keep ``kv_idx > q_idx - W``), else None."""
    if getattr(fn, "__qualname__", "") != "sliding_window_overlay.<locals>.inner_mask" or not fn.__closure__:
        return None
    value = fn.__closure__[0].cell_contents
    return value if isinstance(value, int) and value >= 1 else None


def real_keys(mask, batch: int, kv_len: int, device) -> Tensor:
    """``(B, K)`` bool keys the first query may attend to (for a bidirectional encoder's mask:
    the real tokens); all True without a mask."""
    if mask is None:
        return torch.ones(batch, kv_len, dtype=torch.bool, device=device)
    if isinstance(mask, am.AttentionMask):
        keep = mask.keep(batch, 1, 1, kv_len, device=device)
    elif mask.dtype == torch.bool:
        keep = mask
    else:
        keep = mask > torch.finfo(mask.dtype).min / 2
    return keep[:, 0, 0, :].expand(batch, kv_len)


def _nonzero(offset) -> bool:
    return bool(offset != 0) if isinstance(offset, Tensor) else offset != 0


def _int(offset) -> int:
    return int(offset.item()) if isinstance(offset, Tensor) else int(offset)

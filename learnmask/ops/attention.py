"""``masked_attention``: one op for masked attention with soft token and head gates, and the backend
registry it chooses from.

Backends (each says why it refuses an input, as xformers' ``not_supported_reasons``):

- ``triton``: fused block-sparse kernel (CUDA; :mod:`learnmask.ops.triton_backend`, imported
  lazily — if it cannot be imported, that is its reason);
- ``flex``: compiled FlexAttention with a cached ``BlockMask`` (inference only on CPU);
- ``blocks``: block-gathered SDPA that skips masked key ranges, with a recomputing backward
  (any device; the training path on CPU);
- ``sdpa``: ``scaled_dot_product_attention`` with the dense mask;
- ``reference``: eager float64 math, the spec.

``backend="auto"`` tries them in that order (:func:`auto_order`) and runs the first that accepts
the inputs; a backend named explicitly raises :class:`BackendNotSupported` with its reasons. Users
add backends with :func:`register_backend`.
"""

from __future__ import annotations

import importlib
import logging

from torch import Tensor

from learnmask.ops.base import AttentionBackend, AttentionInputs
from learnmask.ops.blocks import BlocksBackend
from learnmask.ops.flex import BackendUnavailable, FlexBackend
from learnmask.ops.inputs import prepare_inputs
from learnmask.ops.reference import ReferenceBackend
from learnmask.ops.sdpa import SDPABackend

__all__ = ["masked_attention", "register_backend", "get_backend", "auto_order", "backend_reasons",
           "BackendNotSupported", "BackendUnavailable"]

logger = logging.getLogger(__name__)

# The one registry of backends (users extend it with register_backend), in auto's order.
_REGISTRY: dict[str, AttentionBackend] = {
    "flex": FlexBackend(),
    "blocks": BlocksBackend(),
    "sdpa": SDPABackend(),
    "reference": ReferenceBackend(),
}
_ORDER: list[str] = ["triton", "flex", "blocks", "sdpa", "reference"]
_LAZY = {"triton": ("learnmask.ops.triton_backend", "TritonBackend")}
_LAZY_FAILURES: dict[str, str] = {}


class BackendNotSupported(ValueError):
    """No backend (or not the named one) can compute these inputs; the message lists the reasons."""


def register_backend(backend: AttentionBackend, *, before: str | None = "reference", replace: bool = False) -> None:
    """Add ``backend`` (an object with ``name``, ``not_supported_reasons`` and ``__call__``) to the registry.

    Args:
        before: the backend ``auto`` should try after this one (None: try it last).
        replace: allow replacing a backend already registered under the same name.

    Raises:
        TypeError: ``backend`` does not follow the :class:`AttentionBackend` protocol.
        ValueError: the name is taken (and ``replace`` is False) or ``before`` is unknown.
    """
    if not isinstance(backend, AttentionBackend) or not isinstance(getattr(backend, "name", None), str):
        raise TypeError(f"{backend!r} is not an AttentionBackend (needs name, not_supported_reasons, __call__)")
    name = backend.name
    if name in _REGISTRY and not replace:
        raise ValueError(f"backend {name!r} is already registered; pass replace=True to replace it")
    if before is not None and before not in _ORDER:
        raise ValueError(f"before={before!r} is not a known backend; known: {_ORDER}")
    _REGISTRY[name] = backend
    _LAZY_FAILURES.pop(name, None)
    if name not in _ORDER:
        _ORDER.insert(_ORDER.index(before) if before is not None else len(_ORDER), name)


def auto_order() -> list[str]:
    """Backend names in the order ``backend="auto"`` tries them."""
    return list(_ORDER)


def get_backend(name: str) -> AttentionBackend:
    """The registered backend called ``name`` (importing a lazy one on first use).

    Raises:
        BackendNotSupported: a lazy backend failed to import (the message says why).
        ValueError: no backend has that name.
    """
    if name not in _REGISTRY and name in _LAZY:
        _load_lazy(name)
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _LAZY_FAILURES:
        raise BackendNotSupported(f"backend {name!r} is unavailable: {_LAZY_FAILURES[name]}")
    raise ValueError(f"unknown backend {name!r}; known: {auto_order()} or 'auto'")


def _load_lazy(name: str) -> None:
    if name in _LAZY_FAILURES:
        return
    module_name, attribute = _LAZY[name]
    try:
        module = importlib.import_module(module_name)
        if name not in _REGISTRY:
            _REGISTRY[name] = getattr(module, attribute)()
    except Exception as error:  # noqa: BLE001 - an optional backend that cannot load is a reason, not a crash
        _LAZY_FAILURES[name] = f"importing {module_name} failed: {type(error).__name__}: {error}"


def _reasons_of(name: str, inputs: AttentionInputs) -> list[str]:
    try:
        backend = get_backend(name)
    except BackendNotSupported:
        return [_LAZY_FAILURES[name]]
    return list(backend.not_supported_reasons(inputs))


def backend_reasons(q: Tensor, k: Tensor, v: Tensor, *, mask=None, head_gate: Tensor | None = None,
                    token_gate: Tensor | None = None, scale: float | None = None) -> dict[str, list[str]]:
    """For each backend in auto's order, why it would refuse these inputs (an empty list: it accepts)."""
    inputs = prepare_inputs(q, k, v, mask=mask, head_gate=head_gate, token_gate=token_gate, scale=scale)
    return {name: _reasons_of(name, inputs) for name in auto_order()}


def masked_attention(q: Tensor, k: Tensor, v: Tensor, *, mask=None, head_gate: Tensor | None = None,
                     token_gate: Tensor | None = None, backend: str | AttentionBackend = "auto",
                     scale: float | None = None) -> Tensor:
    """Attention restricted by a mask, with soft per-key token gates and per-head output gates.

    ``out[b, h, i] = sum_j softmax_j(scale * q_i . k_j + log z[b, j]) v_j`` over the keys j the mask
    keeps (and z > 0), then ``out[b, h] *= head_gate[(b,) h]``. A query row that keeps no key gives
    exactly 0 and zero (finite) gradients on every backend. Grouped-query attention: query head h
    reads key/value head ``h // (Hq // Hkv)``.

    Args:
        q: (B, Hq, Q, D) queries; k: (B, Hkv, K, D) keys; v: (B, Hkv, K, Dv) values — one dtype
            (float16, bfloat16, float32 or float64) and one device.
        mask: None (attend everywhere), an :class:`~learnmask.masks.attention.AttentionMask`, a bool
            keep-mask broadcastable to (B, Hq, Q, K) with **True = attend**, or an additive float bias
            with 0 = attend and ``-inf``/``finfo.min`` = masked (see :mod:`learnmask.ops.inputs`).
            An ignore-style mask (True = padding) must be inverted or passed through
            ``from_key_padding_mask``.
        head_gate: (Hq,) or (B, Hq), scales each head's output; gradients reach it.
        token_gate: (B, K) (or (1, K)) soft keep value z in [0, 1] per key, added to the scores as
            ``log z`` so gradients reach it; z == 0 removes the key (and gives it zero gradient).
        backend: "auto", a registered name ("triton", "flex", "blocks", "sdpa", "reference") or a
            backend object.
        scale: score scale; default ``1 / sqrt(D)``.

    Returns:
        (B, Hq, Q, Dv) in q's dtype.

    Raises:
        TypeError / ValueError: invalid arguments (see :func:`learnmask.ops.inputs.prepare_inputs`).
        BackendNotSupported: the named backend (or, for "auto", every backend) refuses the inputs;
            the message lists each reason.
    """
    inputs = prepare_inputs(q, k, v, mask=mask, head_gate=head_gate, token_gate=token_gate, scale=scale)
    if not isinstance(backend, str):
        return _run_named(backend, backend.name, inputs)
    if backend != "auto":
        return _run_named(get_backend(backend), backend, inputs)
    refused: dict[str, list[str]] = {}
    for name in auto_order():
        reasons = _reasons_of(name, inputs)
        if reasons:
            refused[name] = reasons
            continue
        try:
            out = get_backend(name)(inputs)
        except BackendUnavailable as error:
            refused[name] = [str(error)]
            continue
        logger.debug("masked_attention: backend %s (refused: %s)", name, refused)
        return out
    raise BackendNotSupported("no masked-attention backend can run these inputs:\n" + _format(refused))


def _run_named(backend: AttentionBackend, name: str, inputs: AttentionInputs) -> Tensor:
    reasons = list(backend.not_supported_reasons(inputs))
    if reasons:
        raise BackendNotSupported(f"backend {name!r} cannot run these inputs:\n" + _format({name: reasons}))
    try:
        return backend(inputs)
    except BackendUnavailable as error:
        raise BackendNotSupported(f"backend {name!r} cannot run these inputs:\n" + _format({name: [str(error)]})) \
            from error


def _format(refused: dict[str, list[str]]) -> str:
    return "\n".join(f"  {name}: {reason}" for name, reasons in refused.items() for reason in reasons)

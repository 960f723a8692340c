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

``backend="auto"`` ranks the backends that accept the inputs by a rough cost estimate
(:func:`choose_backend` says which one it picks and why; :func:`auto_order` is the registry order it
falls back on) and runs the first; if one fails at run time (:class:`BackendUnavailable`) it runs the
next. A backend named explicitly runs or raises :class:`BackendNotSupported` with its reasons. Users
add backends with :func:`register_backend`.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field

from torch import Tensor

from learnmask.ops import cost_model as _cost
from learnmask.ops.base import AttentionBackend, AttentionInputs
from learnmask.ops.blocks import BlocksBackend
from learnmask.ops.common import grad_needed
from learnmask.ops.flex import BackendUnavailable, FlexBackend
from learnmask.ops.inputs import prepare_inputs
from learnmask.ops.nonfinite import non_finite_keys, with_finite_keys
from learnmask.ops.reference import ReferenceBackend
from learnmask.ops.sdpa import SDPABackend, is_pure_causal

__all__ = ["masked_attention", "register_backend", "get_backend", "auto_order", "backend_reasons",
           "choose_backend", "AutoChoice", "BackendNotSupported", "BackendUnavailable"]

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
        before: the backend ``auto`` should try right after this one (None: try it last). A backend
            without an ``estimate_seconds(inputs)`` method is tried immediately before ``before``
            wherever the cost ranking puts that one (see :func:`choose_backend`).
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
    """Backend names in registry order: the preference order ``backend="auto"`` keeps where it has no
    cost estimate (non-CPU devices, backends without one; see :func:`choose_backend`)."""
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
                    token_gate: Tensor | None = None, scale: float | None = None,
                    dropout_p: float = 0.0) -> dict[str, list[str]]:
    """For each backend in auto's order, why it would refuse these inputs (an empty list: it accepts)."""
    inputs = prepare_inputs(q, k, v, mask=mask, head_gate=head_gate, token_gate=token_gate, scale=scale,
                            dropout_p=dropout_p)
    return {name: _reasons_of(name, inputs) for name in auto_order()}


def masked_attention(q: Tensor, k: Tensor, v: Tensor, *, mask=None, head_gate: Tensor | None = None,
                     token_gate: Tensor | None = None, backend: str | AttentionBackend = "auto",
                     scale: float | None = None, dropout_p: float = 0.0) -> Tensor:
    """Attention restricted by a mask, with soft per-key token gates and per-head output gates.

    ``out[b, h, i] = sum_j softmax_j(scale * q_i . k_j + log z[b, j]) v_j`` over the keys j the mask
    keeps (and z > 0), then ``out[b, h] *= head_gate[(b,) h]``; with ``dropout_p`` > 0 the softmax
    weights are dropped out first, as in ``scaled_dot_product_attention``.

    Non-finite inputs, the same on every backend (:mod:`learnmask.ops.nonfinite`): a key removed from
    a row (by the mask or a token gate of 0) cannot affect that row, whatever k and v hold there; a
    row that keeps a key with a non-finite k or v is NaN. Checking costs one pass over k and v (and
    on CUDA one host synchronisation) per call. A query row that keeps no key gives
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
        backend: "auto" (the accepting backend with the lowest cost estimate, see
            :func:`choose_backend`), a registered name ("triton", "flex", "blocks", "sdpa",
            "reference") or a backend object.
        scale: score scale; default ``1 / sqrt(D)``.
        dropout_p: probability in [0, 1) of zeroing each attention probability (the kept ones are
            scaled by ``1 / (1 - p)``; SDPA's ``dropout_p``). The op does not look at a training
            flag: pass 0.0 in eval, as Hugging Face models do. Taken by ``reference``, ``sdpa`` and
            ``blocks``; ``flex`` and ``triton`` refuse p > 0, so ``auto`` does not pick them then.
            Random draws come from torch's global generator (``torch.manual_seed`` repeats them).

    Returns:
        (B, Hq, Q, Dv) in q's dtype.

    Raises:
        TypeError / ValueError: invalid arguments (see :func:`learnmask.ops.inputs.prepare_inputs`).
        BackendNotSupported: the named backend (or, for "auto", every backend) refuses the inputs;
            the message lists each reason.
    """
    inputs = prepare_inputs(q, k, v, mask=mask, head_gate=head_gate, token_gate=token_gate, scale=scale,
                            dropout_p=dropout_p)
    bad = non_finite_keys(inputs)
    if bad is None:
        return _dispatch(inputs, backend)
    return with_finite_keys(lambda clean: _dispatch(clean, backend), inputs, bad)


def _dispatch(inputs: AttentionInputs, backend: str | AttentionBackend) -> Tensor:
    """Run ``backend`` (a name, "auto" or a backend object) on validated inputs."""
    if not isinstance(backend, str):
        return _run_named(backend, backend.name, inputs)
    if backend != "auto":
        return _run_named(get_backend(backend), backend, inputs)
    choice = _choose(inputs)
    refused = dict(choice.refused)
    for name in choice.ranking:
        try:
            out = get_backend(name)(inputs)
        except BackendUnavailable as error:
            refused[name] = [str(error)]
            continue
        _cost.note_run(get_backend(name), inputs)
        logger.debug("masked_attention: backend %s (%s; refused: %s)", name, choice.reason, refused)
        return out
    raise BackendNotSupported("no masked-attention backend can run these inputs:\n" + _format(refused))


def _run_named(backend: AttentionBackend, name: str, inputs: AttentionInputs) -> Tensor:
    reasons = list(backend.not_supported_reasons(inputs))
    if reasons:
        raise BackendNotSupported(f"backend {name!r} cannot run these inputs:\n" + _format({name: reasons}))
    try:
        out = backend(inputs)
        _cost.note_run(backend, inputs)
        return out
    except BackendUnavailable as error:
        raise BackendNotSupported(f"backend {name!r} cannot run these inputs:\n" + _format({name: [str(error)]})) \
            from error


def _format(refused: dict[str, list[str]]) -> str:
    return "\n".join(f"  {name}: {reason}" for name, reasons in refused.items() for reason in reasons)


@dataclass(frozen=True)
class AutoChoice:
    """What ``backend="auto"`` does with some inputs (from :func:`choose_backend`).

    Attributes:
        name: the backend it runs (the first of ``ranking``).
        reason: one line saying why.
        ranking: the accepting backends in the order auto tries them (later ones run only if an
            earlier one fails at run time with :class:`BackendUnavailable`).
        estimates: estimated seconds per call of each accepting backend with a cost model (None where
            the device has no calibrated model, or the backend has none).
        refused: each refusing backend's reasons.
    """

    name: str
    reason: str
    ranking: list[str]
    estimates: dict[str, float | None] = field(default_factory=dict)
    refused: dict[str, list[str]] = field(default_factory=dict)


def choose_backend(q: Tensor, k: Tensor, v: Tensor, *, mask=None, head_gate: Tensor | None = None,
                   token_gate: Tensor | None = None, scale: float | None = None,
                   dropout_p: float = 0.0) -> AutoChoice:
    """The backend ``masked_attention(..., backend="auto")`` would run for these inputs, and why.

    Same arguments as :func:`masked_attention` (shapes there). Whether gradients are needed is read
    as the call would: grad mode on and q, k, v or the token gate requiring grad. Deterministic and
    cheap: no timing, only the mask's structure and the sizes. The rules, in order:

    1. Backends that refuse the inputs are out (their reasons are in ``refused``).
    2. Fast path, any device: no mask, or a pure causal mask with Q == K and no token gate, runs
       ``sdpa`` (SDPA's own fused kernels, ``is_causal=True`` for causal) when it accepts.
    3. On CPU, each accepting backend gets an estimate of its seconds per call (forward, or forward
       plus backward when gradients are needed) from the row plan ``blocks`` uses
       (:func:`learnmask.ops.blocks.plan`: the (batch, query, key) pairs it computes and its number
       of group calls; the plan is cached on the mask, so ``blocks`` reuses it):

       - ``sdpa``: all B·Q·K pairs at the dense-mask rate, backward ``_BWD`` times the forward
         (the eager rate instead when a token gate needs a gradient: SDPA's math kernel; constants in
         :mod:`learnmask.ops.cost_model`);
       - ``blocks``: the plan's pairs plus a fixed cost per group call; with a token gate that needs a
         gradient, a recomputing backward at the eager rate;
       - ``flex`` (inference only on CPU): the plan's pairs at FlexAttention's lower CPU rate, plus
         ``_FLEX_COMPILE_S`` unless this process already ran compiled flex at these shapes — so
         ``auto`` picks it only when it is warm and cheaper;
       - ``reference``: float64 eager math (last resort);
       - a registered backend with an ``estimate_seconds(inputs)`` method: its own estimate.

       The cheapest runs first, ties broken by registry order (:func:`auto_order`).
    4. On other devices (no calibrated model): registry order, triton > flex > blocks > sdpa >
       reference.

    A backend with no estimate keeps its registry place: it is tried immediately before the
    backend it was registered before (``register_backend(before=...)``), or last.

    Returns:
        :class:`AutoChoice` with the name, a one-line reason, the full ranking and the estimates.

    Raises:
        TypeError / ValueError: invalid arguments (as :func:`masked_attention`).
        BackendNotSupported: every backend refuses the inputs (the message lists each reason).
    """
    inputs = prepare_inputs(q, k, v, mask=mask, head_gate=head_gate, token_gate=token_gate, scale=scale,
                            dropout_p=dropout_p)
    choice = _choose(inputs)
    if not choice.ranking:
        raise BackendNotSupported("no masked-attention backend can run these inputs:\n" + _format(choice.refused))
    return choice


def _choose(inputs: AttentionInputs) -> AutoChoice:
    """:func:`choose_backend` on validated inputs (``name`` is "" when every backend refuses)."""
    refused: dict[str, list[str]] = {}
    accepting: list[str] = []
    for name in auto_order():
        reasons = _reasons_of(name, inputs)
        if reasons:
            refused[name] = reasons
        else:
            accepting.append(name)
    if not accepting:
        return AutoChoice("", "every backend refuses", [], {}, refused)
    q, k = inputs.q, inputs.k
    grads = grad_needed(inputs)
    what = "forward+backward" if grads else "forward"
    no_mask = inputs.mask is None
    causal_fast = inputs.token_gate is None and is_pure_causal(inputs.structure) and q.shape[2] == k.shape[2]
    if "sdpa" in accepting and isinstance(get_backend("sdpa"), SDPABackend) and (no_mask or causal_fast):
        kind = "no mask: SDPA's fused kernel" if no_mask else "plain causal mask: SDPA's is_causal kernel"
        ranking = ["sdpa"] + [n for n in accepting if n != "sdpa"]
        return AutoChoice("sdpa", f"{kind} ({what})", ranking, {}, refused)
    if q.device.type != "cpu":
        return AutoChoice(accepting[0], f"first accepting backend in registry order on {q.device.type} "
                          "(the cost model is calibrated on CPU only)", accepting, {}, refused)
    if q.shape[2] == 0 or k.shape[2] == 0:
        return AutoChoice(accepting[0], "empty sequence: nothing to compute", accepting, {}, refused)
    memo: list[tuple[int, int, int]] = []

    def stats() -> tuple[int, int, int]:
        if not memo:
            memo.append(_plan_stats(inputs))
        return memo[0]

    estimates = {name: _estimate(name, inputs, grads, stats) for name in accepting}
    ranking = _rank(accepting, estimates)
    best = ranking[0]
    cost = estimates.get(best)
    if cost is None:
        reason = f"{best} has no cost estimate and is registered before the cheapest estimated backend"
    else:
        others = ", ".join(f"{n} {1e3 * t:.3g}" for n, t in sorted(estimates.items(), key=lambda x: (x[1] is None,
                                                                                                    x[1] or 0))
                           if n != best and t is not None)
        versus = f" vs {others} ms" if others else ""
        reason = f"lowest estimated CPU time, {what}: {best} {1e3 * cost:.3g} ms{versus}"
        if best == "blocks":
            frac = stats()[0] / _cost.dense_pairs(inputs)
            reason += f" (plan keeps {frac:.0%} of the pairs)"
    return AutoChoice(best, reason, ranking, estimates, refused)


def _rank(accepting: list[str], estimates: dict[str, float | None]) -> list[str]:
    """Estimated backends by cost (ties: registry order); each unestimated one right before the next
    estimated backend that follows it in registry order, or last."""
    order = {name: i for i, name in enumerate(accepting)}
    modelled = sorted((n for n in accepting if estimates.get(n) is not None), key=lambda n: (estimates[n], order[n]))
    attached: dict[str | None, list[str]] = {}
    for name in accepting:
        if estimates.get(name) is None:
            after = next((m for m in accepting[order[name] + 1:] if estimates.get(m) is not None), None)
            attached.setdefault(after, []).append(name)
    ranking: list[str] = []
    for name in modelled:
        ranking += attached.get(name, []) + [name]
    return ranking + attached.get(None, [])


def _plan_stats(inputs: AttentionInputs) -> tuple[int, int, int]:
    """:func:`~learnmask.ops.cost_model.plan_stats` with the registered ``blocks`` backend's sizes."""
    backend = _REGISTRY.get("blocks")
    return _cost.plan_stats(inputs, getattr(backend, "block_q", 64), getattr(backend, "backward_rows", 128))


def _estimate(name: str, inputs: AttentionInputs, grads: bool, stats) -> float | None:
    return _cost.estimate(get_backend(name), inputs, grads, stats)

"""The CPU cost model behind ``masked_attention(backend="auto")``: seconds per call of each backend
from the sizes and the ``blocks`` row plan (the (batch, query, key) pairs it computes and its group
calls), never from timing at run time. :func:`learnmask.ops.attention.choose_backend` ranks by it.

Legend: B batch, Hq query heads, Q query length, K key length, D/Dv head sizes.
"""

from __future__ import annotations

import torch

from learnmask.ops import blocks as _blocks
from learnmask.ops.base import AttentionBackend, AttentionInputs
from learnmask.ops.blocks import BlocksBackend
from learnmask.ops.flex import FlexBackend
from learnmask.ops.reference import ReferenceBackend
from learnmask.ops.sdpa import SDPABackend

# Seconds of one call, fitted (non-negative least squares on relative error) to B=2, Hq=8, D=64
# fp32 timings over S in {256, 512, 1024, 2048} and four masks on 2 threads by
# experiments/bench/calibrate_auto.py (paper/results/auto-calibration.json; its check lists auto's
# pick in each case against the faster backend). Only the ranking matters. Compute rates grow with
# the thread count (by _THREAD_GAIN per extra thread), per-call overheads do not. The `blocks`
# constants were refitted when its calls moved to two lanes (learnmask.ops.cpu_pool), and again when its
# plan was cut at document starts and its forward took runs of equal pieces (learnmask.ops.block_runs),
# each time on a machine slower than the first fit (1.5x, 1.76x): rates and overheads are scaled by the
# ratio of the fits' _R_MASKED so that the constants not fitted by the script (_R_DENSE, _R_EAGER, ...)
# keep their units.
_R_DENSE = 5.5e10    # multiply-adds per second of SDPA's fused CPU kernel without a mask
_R_MASKED = 4.45e10  # ... with a dense mask (it reads a mask value per pair)
_R_BLOCKS = 4.65e10  # ... of the per-group fused calls of `blocks`
_R_EAGER = 1.5e10    # eager matmul/softmax: `blocks`' recomputing backward, SDPA's math kernel
_R_FLEX = 1.0e10     # compiled FlexAttention on CPU (block-sparse tiles of 128)
_R_REFERENCE = 1e9   # float64 eager reference
_C_CALL = 3.05e-4    # seconds of overhead per `blocks` group call in the forward (slicing, partial-tile mask)
_C_CALL_BWD = 7.6e-4  # ... and in its backward
_C_FLEX_CALL = 1e-3  # seconds of overhead per compiled FlexAttention call
_FLEX_COMPILE_S = 10.0  # a first compiled FlexAttention call at a new shape (tens of seconds on CPU)
_BWD = 2.3           # backward / forward time of SDPA's fused kernel (and of the reference)
_BWD_BLOCKS = 2.26   # ... of `blocks`' per-group calls
_FLEX_WASTE = 1.3    # FlexAttention's 128-wide tiles compute more pairs than `blocks`' plan
_THREAD_GAIN = 0.8

# (shapes, dtype, device, mask kind, gate) of the compiled FlexAttention calls this process has run:
# flex is worth ranking by its run time only once its kernel is compiled for that shape.
_FLEX_WARM: set[tuple] = set()


def threads_gain() -> float:
    """How much faster compute runs on this process's torch threads than on one (>= 1)."""
    return 1.0 + _THREAD_GAIN * (max(1, torch.get_num_threads()) - 1)


def dense_pairs(inputs: AttentionInputs) -> int:
    """B·Q·K: the (batch, query, key) pairs of dense attention over ``inputs``."""
    return inputs.q.shape[0] * inputs.q.shape[2] * inputs.k.shape[2]


def work_per_pair(inputs: AttentionInputs) -> int:
    """Multiply-adds per (batch, query, key) pair over all query heads: Hq·(D + Dv)."""
    return inputs.q.shape[1] * (inputs.q.shape[3] + inputs.v.shape[3])


def plan_stats(inputs: AttentionInputs, block_q: int = 64, backward_rows: int = 128) -> tuple[int, int, int]:
    """(pairs, group calls, backward row chunks) of the ``blocks`` plan for ``inputs`` with query
    blocks of ``block_q`` rows and backward chunks of ``backward_rows``."""
    groups, _ = _blocks.plan(inputs, block_q)
    busy = [g for g in groups if g.k1 > g.k0]
    pairs = sum((g.b1 - g.b0) * (g.q1 - g.q0) * (g.k1 - g.k0) for g in busy)
    chunks = sum(-(-(g.q1 - g.q0) // backward_rows) for g in busy)
    return pairs, len(busy), chunks


def gate_grad(inputs: AttentionInputs) -> bool:
    """Whether the token gate will want a gradient from this call."""
    return inputs.token_gate is not None and inputs.token_gate.requires_grad and torch.is_grad_enabled()


def estimate(backend: AttentionBackend, inputs: AttentionInputs, grads: bool, stats) -> float | None:
    """Seconds per call of ``backend`` on CPU (None: no model for it); ``stats()`` gives
    :func:`plan_stats` of the inputs (computed once, by the caller's ``blocks`` settings)."""
    own = getattr(backend, "estimate_seconds", None)
    if callable(own):
        value = own(inputs)
        return None if value is None else float(value)
    work, gain = work_per_pair(inputs), threads_gain()
    dense = dense_pairs(inputs) * work
    if inputs.dropout_p > 0 and isinstance(backend, (SDPABackend, BlocksBackend)):
        # SDPA's dropout runs its math kernel on CPU: every computed pair at the eager rate, for sdpa on
        # the dense mask and for blocks on its plan's groups (plus a call per group)
        pairs, calls, _ = stats() if isinstance(backend, BlocksBackend) else (dense_pairs(inputs), 0, 0)
        fwd = pairs * work / _R_EAGER / gain + calls * _C_CALL
        return fwd * (1 + _BWD) if grads else fwd
    if isinstance(backend, SDPABackend):
        fwd = dense / (_R_DENSE if inputs.mask is None else _R_MASKED) / gain
        if not grads:
            return fwd
        return fwd + (3 * dense / _R_EAGER / gain if gate_grad(inputs) else _BWD * fwd)
    if isinstance(backend, BlocksBackend):
        pairs, calls, chunks = stats()
        compute = pairs * work / _R_BLOCKS / gain
        fwd = compute + calls * _C_CALL
        if not grads:
            return fwd
        if gate_grad(inputs):  # recomputing backward, one eager pass per chunk of rows
            return fwd + 3 * pairs * work / _R_EAGER / gain + chunks * _C_CALL
        return fwd + _BWD_BLOCKS * compute + calls * _C_CALL_BWD
    if isinstance(backend, FlexBackend):
        if grads:
            return None  # refused on CPU already; no model for other cases
        pairs, _, _ = stats()
        cost = _FLEX_WASTE * pairs * work / _R_FLEX / gain + _C_FLEX_CALL
        if backend.compile and flex_key(inputs) not in _FLEX_WARM:
            cost += _FLEX_COMPILE_S
        return cost
    if isinstance(backend, ReferenceBackend):
        return dense / _R_REFERENCE * (1 + (_BWD if grads else 0))
    return None


def flex_key(inputs: AttentionInputs) -> tuple:
    """What makes compiled FlexAttention compile anew: shapes, dtype, device, mask kind, gate presence."""
    mask = inputs.mask
    kind = None if mask is None else (type(mask).__name__, getattr(mask, "name", None))
    return (tuple(inputs.q.shape), tuple(inputs.k.shape), tuple(inputs.v.shape), inputs.q.dtype, str(inputs.q.device),
            kind, inputs.token_gate is not None)


def note_run(backend: AttentionBackend, inputs: AttentionInputs) -> None:
    """Remember that compiled FlexAttention is warm for these inputs' shapes."""
    if isinstance(backend, FlexBackend) and backend.compile:
        _FLEX_WARM.add(flex_key(inputs))

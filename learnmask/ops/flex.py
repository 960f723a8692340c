"""The ``flex`` masked-attention backend: FlexAttention (Dong et al., 2024) with a cached ``BlockMask``.

Hard structure goes to the ``BlockMask`` (built once per mask object and call sizes, see
:meth:`learnmask.masks.attention.AttentionMask.block_mask`); a soft token gate goes to a ``score_mod``
that adds ``log z[b, kv_idx]`` to the score. A ``mask_mod`` carries no gradient, a ``score_mod`` does,
and a new gate every step needs no new ``BlockMask`` (a fresh closure over a tensor of the same shape
does not recompile). Rows with no kept key come out as 0 from FlexAttention itself.

By default the backend calls ``torch.compile(flex_attention)`` (compiled once per process; each new
shape compiles again, which takes seconds to a minute on CPU). ``compile=False`` runs FlexAttention
eagerly (a dense reference implementation: for tests at small shapes).

Limits (each reported by :meth:`FlexBackend.not_supported_reasons`, per input): the mask must be None
or an :class:`~learnmask.masks.attention.AttentionMask` (not a dense tensor); on CPU, FlexAttention
has no backward (torch 2.13), so inputs that need gradients are refused there, and compiled
FlexAttention takes no float64 and gives wrong rows at key lengths K % 16 == 8 (an upstream fault:
:func:`faulty_cpu_kv_length`); no attention dropout; no empty sequence. A compilation that fails
refuses that input configuration from then on, not the backend.

Legend: B batch, Hq query heads, Hkv key/value heads, Q query length, K key length, D head dim.
"""

from __future__ import annotations

import functools
import shutil

import torch
from torch import Tensor

from learnmask.ops.base import AttentionInputs
from learnmask.ops.common import apply_head_gate, grad_needed, log_gate

__all__ = ["FlexBackend", "BackendUnavailable", "compiled_flex_attention"]


class BackendUnavailable(RuntimeError):
    """A backend that accepted the inputs found at run time that it cannot run (e.g. compilation
    failed); ``backend="auto"`` moves on to the next backend."""


def _flex_module():
    try:
        from torch.nn.attention import flex_attention as module
    except ImportError:
        return None
    return module


@functools.cache
def compiled_flex_attention():
    """``torch.compile(flex_attention)``, created once per process (shapes are static: each new
    shape compiles anew rather than through dynamic shapes)."""
    return torch.compile(_flex_module().flex_attention, dynamic=False)


@functools.cache
def _compile_reasons(device_type: str) -> tuple[str, ...]:
    try:
        import torch._dynamo
        if not torch._dynamo.is_dynamo_supported():
            return ("torch.compile (dynamo) is not supported on this Python/platform",)
    except Exception as error:  # noqa: BLE001 - any failure means: cannot compile
        return (f"torch.compile is unavailable: {error}",)
    if device_type == "cpu":
        try:
            from torch._inductor import config
            compiler = config.cpp.cxx[0] if isinstance(config.cpp.cxx, tuple) else config.cpp.cxx
        except Exception:  # noqa: BLE001
            compiler = None
        if not any(shutil.which(c) for c in filter(None, (compiler, "g++", "c++", "clang++"))):
            return ("no C++ compiler found for torch.compile on CPU (install g++ or set "
                    "torch._inductor.config.cpp.cxx)",)
    return ()


_RECOMPILE_LIMIT = 64


def _recompile_room():
    """Raise dynamo's per-function recompile limit (8 by default) while calling compiled flex_attention:
    every mask kind (its ``mask_mod`` code), gate, shape and dtype is one compiled variant of the same
    function, and past the limit dynamo silently runs FlexAttention eagerly (dense and slow)."""
    import torch._dynamo.config as config

    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{name: max(getattr(config, name), _RECOMPILE_LIMIT)})


_FAILURES_KEPT = 64

def faulty_cpu_kv_length(kv_len: int) -> bool:
    """Whether torch's compiled FlexAttention on CPU returns wrong rows at this key length (torch 2.13,
    x86 AVX2): K % 16 == 8.

    Measured with plain compiled ``flex_attention`` against float64 SDPA (1, 2 and 3 threads; B x H up
    to 4 x 8; Q from 1 to 512; K from 1 to 512; D 4 to 128; float32, float16, bfloat16; with and
    without a block mask): wrong rows — at random, NaN at times, a different set on each call of the
    same compiled kernel — at K = 8, 40, 56, 72, 88, 104, 136, 264 with D = 8 or 16, at every thread
    count (the report that two threads are right did not hold) and any Q; right at K = 1, 2, 4, 7, 9,
    12, 15, 16, 17, 20, 32, 33, 36, 48, 64, 128, 129, 256, 512, and in the samples taken at K = 24 and
    at D = 4, 32, 64, 128. The fault is intermittent (it reads memory it should not), so the whole
    K % 16 == 8 class is refused, every head dim and dtype. The fault lies in inductor's AVX2 kernels:
    on an AVX-512 CPU (AMD EPYC) the same checks were right in 320 of 320 calls with its own kernels and
    wrong in 60 of 320 with ``ATEN_CPU_CAPABILITY=avx2``; the class is refused on every CPU all the same
    (a kernel that reads memory it should not may be right by chance). ``tests/test_ops_flex_upstream.py``
    runs plain compiled FlexAttention with AVX2 kernels there and fails once torch is fixed: then this
    can go.
    """
    return kv_len % 16 == 8


def upstream_fault(inputs: AttentionInputs) -> str | None:
    """Why compiled FlexAttention gives wrong results for these inputs (a known upstream fault), or None."""
    kv_len = inputs.k.shape[2]
    if inputs.q.device.type == "cpu" and faulty_cpu_kv_length(kv_len):
        return (f"compiled FlexAttention on CPU (torch {torch.__version__}) returns wrong rows at random when the "
                f"key length K % 16 == 8 (here K = {kv_len}; a known upstream fault, pinned by "
                "tests/test_ops_flex_upstream.py)")
    return None


def _config(inputs: AttentionInputs, block_size: int) -> tuple:
    """What a compilation depends on: shapes, dtype, device, the mask's kind, the gate, the block size."""
    mask = inputs.mask
    kind = None if mask is None else (type(mask).__name__, getattr(mask, "name", None))
    return (tuple(inputs.q.shape), tuple(inputs.k.shape), tuple(inputs.v.shape), inputs.q.dtype, str(inputs.q.device),
            kind, inputs.token_gate is not None, block_size)


def _gate_score_mod(lg: Tensor):
    """``score_mod`` adding the log token gate lg (B, K) to each score (a fresh closure per call over a
    tensor of the same shape: no recompilation, no BlockMask rebuild)."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + lg[b, kv_idx]
    return score_mod


class FlexBackend:
    """FlexAttention with a cached ``BlockMask`` and soft gates as a ``score_mod``.

    Args:
        compile: call the compiled ``flex_attention`` (True, the fast path) or the eager one.
        block_size: FlexAttention block size of the ``BlockMask`` (128 is FlexAttention's default).
    """

    name = "flex"

    def __init__(self, compile: bool = True, block_size: int = 128) -> None:
        self.compile = compile
        self.block_size = block_size
        self._failures: dict[tuple, str] = {}  # per input configuration (see _config), oldest dropped

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        """One sentence per reason FlexAttention cannot compute ``inputs`` here."""
        from learnmask.masks.attention import AttentionMask

        if _flex_module() is None:
            return [f"FlexAttention is not in torch {torch.__version__} (needs torch >= 2.5)"]
        reasons = []
        device = inputs.q.device.type
        if inputs.mask is not None and not isinstance(inputs.mask, AttentionMask):
            reasons.append("the mask is a dense tensor; flex needs an AttentionMask (learnmask.masks.attention) "
                           "to build a BlockMask")
        if device in ("cpu", "mps") and grad_needed(inputs):
            reasons.append(f"FlexAttention has no backward on {device} in torch {torch.__version__}; inputs "
                           "that need gradients go to another backend (e.g. 'blocks')")
        if inputs.dropout_p > 0:
            reasons.append(f"dropout_p={inputs.dropout_p}: FlexAttention has no attention dropout; "
                           "'sdpa', 'blocks' and 'reference' take it")
        if inputs.q.shape[2] == 0 or inputs.k.shape[2] == 0:
            reasons.append("empty sequence (Q == 0 or K == 0)")
        if self.compile:
            reasons.extend(_compile_reasons(device))
            fault = upstream_fault(inputs)
            if fault is not None:
                reasons.append(fault)
            if device == "cpu" and inputs.q.dtype == torch.float64:
                reasons.append("compiled FlexAttention on CPU takes float32, float16 and bfloat16, not float64 "
                               "(inductor cannot lower it)")
            failure = self._failures.get(_config(inputs, self.block_size))
            if failure is not None:
                reasons.append(failure)
        return reasons

    def __call__(self, inputs: AttentionInputs) -> Tensor:
        """Output (B, Hq, Q, Dv) in q's dtype.

        Raises:
            BackendUnavailable: compilation failed (the reason is kept and reported from now on for
                inputs of the same configuration: shapes, dtype, device, mask kind, gate).
        """
        q, k, v = inputs.q, inputs.k, inputs.v
        if q.device.type in ("cpu", "mps") and not torch.is_grad_enabled():
            q, k, v = q.detach(), k.detach(), v.detach()  # FlexAttention refuses requires_grad there even in no_grad
        batch, heads, q_len, kv_len = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        block_mask = None
        if inputs.mask is not None:
            block_mask = inputs.mask.block_mask(batch, heads, q_len, kv_len, q.device, self.block_size)
        score_mod = None
        if inputs.token_gate is not None:
            lg = log_gate(inputs.token_gate, torch.float64 if q.dtype == torch.float64 else torch.float32)
            score_mod = _gate_score_mod(lg.expand(batch, kv_len))
        kwargs = dict(score_mod=score_mod, block_mask=block_mask, scale=inputs.scale,
                      enable_gqa=k.shape[1] != heads)
        if not self.compile:
            out = _flex_module().flex_attention(q, k, v, **kwargs)
        else:
            try:
                with _recompile_room():
                    out = compiled_flex_attention()(q, k, v, **kwargs)
            except Exception as error:  # noqa: BLE001 - inputs were validated: a failure here is the compiler's
                failure = f"compiling flex_attention failed: {type(error).__name__}: {str(error)[:200]}"
                if len(self._failures) >= _FAILURES_KEPT:
                    self._failures.pop(next(iter(self._failures)))
                self._failures[_config(inputs, self.block_size)] = failure
                raise BackendUnavailable(failure) from error
        return apply_head_gate(out, inputs.head_gate)

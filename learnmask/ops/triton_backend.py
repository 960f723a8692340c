"""The ``triton`` masked-attention backend: a fused FlashAttention-2 kernel (Dao, 2023) that skips
fully masked blocks and fuses soft token gates.

The kernel evaluates a :class:`~learnmask.masks.structure.MaskStructure` (causal, prefix-LM, sliding
window, chunks, packed documents, key padding) from a few integers and small per-row tables: each
query block visits only the key blocks that hold a kept pair, evaluates the mask elementwise only in
partial blocks, and never allocates a (B, H, Q, K) tensor. A token gate z (B, K) adds ``log z[b, j]``
to the scores inside the kernel (z == 0 removes the key) and gets its gradient from the backward
kernel; a head gate scales the output with plain autograd.

Runs on CUDA (fp16, bf16, fp32; fp32 matmuls in full IEEE precision, not TF32); on CPU only under
Triton's interpreter, which is enabled by ``TRITON_INTERPRET=1`` in the environment *before*
triton is first imported (``@triton.jit`` reads it when it decorates a function, and triton's own
library is decorated at ``import triton``) — meant for tests at small shapes. bfloat16 is refused
there: the triton 3.9 interpreter computes bfloat16 dot products wrongly.

Legend: B batch, Hq query heads, Hkv key/value heads (Hq % Hkv == 0), Q query length, K key length,
D head dim, Dv value head dim (each at most 128; other than powers of two they are zero-padded).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import weakref

import torch
from einops import rearrange
from torch import Tensor

from learnmask.masks.structure import MaskStructure
from learnmask.ops.base import AttentionInputs

MAX_HEAD_DIM = 128
_KERNELS = "learnmask.ops.triton_kernels"


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def interpreting() -> bool:
    """Whether the kernels run (or, once imported, would run) in Triton's CPU interpreter."""
    module = sys.modules.get(_KERNELS)
    if module is not None:
        return bool(module.INTERPRETED)
    return _env_interpret()


def _interpreter_mismatch() -> bool:
    """TRITON_INTERPRET=1 now, but triton was imported without it (the kernels would fail)."""
    if _KERNELS in sys.modules or "triton" not in sys.modules or not _env_interpret():
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return not isinstance(tl.standard.cdiv, InterpretedFunction)


_NO_MASK = MaskStructure()
"""The structure of "no mask" (one object, so the per-structure launch cache is reused)."""


def _structure_of(inputs: AttentionInputs) -> MaskStructure | None:
    if inputs.structure is not None:
        return inputs.structure
    return _NO_MASK if inputs.mask is None else None


def _shape_reasons(name: str, t: Tensor | None, expected: tuple[int, ...], batch: int) -> list[str]:
    if t is None:
        return []
    if t.dim() != len(expected) or t.shape[0] not in (1, batch) or tuple(t.shape[1:]) != expected[1:]:
        return [f"{name} has shape {tuple(t.shape)}; expected {expected} (or batch 1)"]
    return []


def _structure_reasons(s: MaskStructure, batch: int, q_len: int, kv_len: int) -> list[str]:
    reasons = _shape_reasons("q_document_ids", s.q_document_ids, (batch, q_len), batch)
    reasons += _shape_reasons("kv_document_ids", s.kv_document_ids, (batch, kv_len), batch)
    reasons += _shape_reasons("key_padding", s.key_padding, (batch, kv_len), batch)
    if s.prefix_lengths is not None and s.prefix_lengths.numel() not in (1, batch):
        reasons.append(f"prefix_lengths has {s.prefix_lengths.numel()} values; expected {batch} (one per batch)")
    return reasons


def _tensor_reasons(inputs: AttentionInputs) -> list[str]:
    q, k, v = inputs.q, inputs.k, inputs.v
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return [f"q, k, v must be 4-d (B, H, S, D); got {q.dim()}, {k.dim()}, {v.dim()} dims"]
    reasons = []
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"dtype {q.dtype} is not supported (float16, bfloat16, float32)")
    elif q.dtype == torch.bfloat16 and q.device.type != "cuda" and interpreting():
        reasons.append("bfloat16 is not supported by the Triton interpreter (its bf16 dot products are wrong); "
                       "use float16/float32 on CPU or run on CUDA")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        reasons.append(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.shape[3] > MAX_HEAD_DIM or v.shape[3] > MAX_HEAD_DIM:
        reasons.append(f"head dims D={q.shape[3]}, Dv={v.shape[3]}; the kernel takes at most {MAX_HEAD_DIM}")
    if k.shape[3] != q.shape[3]:
        reasons.append(f"q head dim {q.shape[3]} != k head dim {k.shape[3]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        reasons.append(f"query heads {q.shape[1]} are not a multiple of key/value heads {k.shape[1]}")
    if q.shape[2] == 0 or k.shape[2] == 0:
        reasons.append("empty sequence (Q == 0 or K == 0); use the reference backend")
    if inputs.dropout_p > 0:
        reasons.append(f"dropout_p={inputs.dropout_p}: the fused kernel has no attention dropout; 'sdpa', "
                       "'blocks' and 'reference' take it")
    if inputs.token_gate is not None and tuple(inputs.token_gate.shape) not in ((q.shape[0], k.shape[2]),
                                                                                (1, k.shape[2])):
        reasons.append(f"token_gate has shape {tuple(inputs.token_gate.shape)}; expected (B, K) = "
                       f"({q.shape[0]}, {k.shape[2]})")
    return reasons


class TritonBackend:
    """Fused block-sparse masked attention (FlashAttention-2, Dao 2023) for structured masks.

    ``block_sizes`` (BLOCK_M, BLOCK_N) fixes the tile sizes (powers of two >= 16); None autotunes a
    few configurations per shape on CUDA and uses (16, 16) in the interpreter. ``cpu_interpreter``
    lets this instance take CPU tensors when the kernels run in Triton's interpreter; it is off by
    default so that ``backend="auto"`` never picks the (very slow) interpreter, even in a test session
    that enabled it.
    """

    name = "triton"

    def __init__(self, block_sizes: tuple[int, int] | None = None, *, cpu_interpreter: bool = False) -> None:
        self.block_sizes = block_sizes
        self.cpu_interpreter = cpu_interpreter
        self._accepted: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        """One sentence per reason this backend cannot compute ``inputs`` (empty when it can)."""
        reasons = []
        if importlib.util.find_spec("triton") is None:
            reasons.append("triton is not installed (pip install 'learnmask[triton]')")
        elif _interpreter_mismatch():
            reasons.append("TRITON_INTERPRET=1 was set after triton was imported; the interpreter needs it "
                           "in the environment before the first `import triton`")
        device = inputs.q.device.type
        if device != "cuda" and not interpreting():
            reasons.append(f"tensors are on {device}; the triton kernel needs CUDA (or, for tests, Triton's CPU "
                           "interpreter: TRITON_INTERPRET=1 in the environment before triton is imported)")
        elif device != "cuda" and not self.cpu_interpreter:
            reasons.append(f"tensors are on {device}; the triton kernel runs there only in Triton's interpreter "
                           "(slow, for tests), which this instance does not use: pass "
                           "TritonBackend(cpu_interpreter=True) or call triton_attention")
        structure = _structure_of(inputs)
        if structure is None:
            reasons.append("the mask has no MaskStructure (a user predicate or a dense tensor); the triton "
                           "kernel takes causal, prefix, window, chunk, document and key-padding masks")
        reasons += _tensor_reasons(inputs)
        if structure is not None and not reasons:
            reasons += _structure_reasons(structure, inputs.q.shape[0], inputs.q.shape[2], inputs.k.shape[2])
        return reasons

    def __call__(self, inputs: AttentionInputs) -> Tensor:
        """Output (B, Hq, Q, Dv) in q's dtype.

        Raises:
            ValueError: the inputs are not supported (the message lists the reasons).
        """
        structure = _structure_of(inputs)
        key = _accept_key(inputs, structure)
        accepted = None if key is None else self._accepted.get(structure)
        if accepted is None or key not in accepted:
            reasons = self.not_supported_reasons(inputs)
            if reasons:
                raise ValueError("triton backend cannot run these inputs: " + "; ".join(reasons))
            if key is not None:  # CUDA inputs: the same shapes, dtypes and structure skip these checks next time
                accepted = self._accepted.setdefault(structure, set())
                if len(accepted) > 64:
                    accepted.clear()
                accepted.add(key)
        return _run(inputs.q, inputs.k, inputs.v, structure, inputs.token_gate,
                    inputs.head_gate, inputs.scale, self.block_sizes)


def _accept_key(inputs: AttentionInputs, structure: MaskStructure | None):
    """What the checks of ``not_supported_reasons`` depend on, for CUDA inputs with a structure (else None)."""
    q, k, v = inputs.q, inputs.k, inputs.v
    if structure is None or q.device.type != "cuda":
        return None
    z = inputs.token_gate
    return (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
            None if z is None else z.shape, inputs.dropout_p,
            *(None if t is None else t.shape for t in (structure.prefix_lengths, structure.q_document_ids,
                                                       structure.kv_document_ids, structure.key_padding)))


def _blocks(block_sizes: tuple[int, int] | None) -> tuple[int, int] | None:
    if block_sizes is None:
        return (16, 16) if interpreting() else None
    for size in block_sizes:
        if size < 16 or size & (size - 1):
            raise ValueError(f"block sizes must be powers of two >= 16; got {block_sizes}")
    return tuple(block_sizes)


def _prepare(q: Tensor, k: Tensor, v: Tensor, token_gate: Tensor | None):
    """q, k, v with unit stride in the head dim (copied only when not) and the gate as (B, K)
    float32 contiguous (no op when it already is: no extra autograd node either)."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    z = token_gate
    if z is not None:
        if z.dtype != torch.float32:
            z = z.to(torch.float32)
        if z.shape[0] != q.shape[0]:
            z = z.expand(q.shape[0], k.shape[2])
        if not z.is_contiguous():
            z = z.contiguous()
    return q, k, v, z


def _run(q: Tensor, k: Tensor, v: Tensor, structure: MaskStructure, token_gate: Tensor | None,
         head_gate: Tensor | None, scale: float, block_sizes: tuple[int, int] | None) -> Tensor:
    from learnmask.ops import triton_launch

    q, k, v, z = _prepare(q, k, v, token_gate)
    plan = triton_launch.LaunchPlan.build(structure, q, k, v, scale, _blocks(block_sizes), z is not None)
    out = triton_launch.FusedMaskedAttention.apply(q, k, v, z, plan)
    if head_gate is not None:
        pattern = "h -> 1 h 1 1" if head_gate.dim() == 1 else "b h -> b h 1 1"
        out = out * rearrange(head_gate, pattern).to(out.dtype)
    return out


def triton_attention(q: Tensor, k: Tensor, v: Tensor, structure: MaskStructure | None = None, *,
                     token_gate: Tensor | None = None, head_gate: Tensor | None = None,
                     scale: float | None = None, block_sizes: tuple[int, int] | None = None) -> Tensor:
    """Masked attention with the fused kernel, without going through ``masked_attention``.

    Args:
        q: (B, Hq, Q, D); k: (B, Hkv, K, D); v: (B, Hkv, K, Dv); one dtype (fp16, bf16 or fp32).
        structure: the mask (None: every pair kept). Keep-mask convention: kept pairs attend.
        token_gate: (B, K) in [0, 1]; z == 0 removes key j, z > 0 adds log z to its scores.
        head_gate: (Hq,) or (B, Hq), multiplies each head's output.
        scale: score scale (default 1 / sqrt(D)).
        block_sizes: (BLOCK_M, BLOCK_N) or None (autotuned on CUDA, (16, 16) when interpreted).

    Returns:
        (B, Hq, Q, Dv) in q's dtype; rows keeping no key are exactly 0 with zero gradients.

    Raises:
        ValueError: the inputs are not supported (the message lists the reasons).
    """
    inputs = AttentionInputs(q=q, k=k, v=v, mask=structure, structure=_NO_MASK if structure is None else structure,
                             head_gate=head_gate, token_gate=token_gate,
                             scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale))
    return _instance(block_sizes)(inputs)


_INSTANCES: dict = {}


def _instance(block_sizes: tuple[int, int] | None) -> TritonBackend:
    """One opted-in backend per block-size choice, so its accepted-inputs cache persists across calls."""
    key = None if block_sizes is None else tuple(block_sizes)
    backend = _INSTANCES.get(key)
    if backend is None:
        backend = _INSTANCES[key] = TritonBackend(block_sizes, cpu_interpreter=True)
    return backend


def block_counts(q: Tensor, k: Tensor, v: Tensor, structure: MaskStructure, *, block_m: int = 16,
                 block_n: int = 16) -> dict[str, Tensor]:
    """Blocks the kernels visit, for tests and benchmarks (runs the forward and dK/dV kernels once).

    Returns:
        ``forward``: (B, Hq, ceil(Q / block_m), 2) int32, per query block the key blocks visited
        and how many of them were full (no elementwise mask); ``backward``: (B, Hkv,
        ceil(K / block_n), 2), the same per key block over query blocks (summed over the group's
        query heads, which share it, counted once).
    """
    from learnmask.ops import triton_launch

    q, k, v, _ = _prepare(q, k, v, None)
    plan = triton_launch.LaunchPlan.build(structure, q, k, v, 1.0 / math.sqrt(q.shape[-1]), _blocks((block_m, block_n)),
                                          False)
    batch, heads, q_len, _ = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    fwd = torch.zeros(batch, heads, -(-q_len // block_m), 2, dtype=torch.int32, device=q.device)
    out, lse2 = triton_launch.forward(q, k, v, None, plan, count=fwd)
    bwd = torch.zeros(batch, kv_heads, -(-kv_len // block_n), 2, dtype=torch.int32, device=q.device)
    triton_launch.backward(torch.zeros_like(out), q, k, v, None, out, lse2, plan, need_dq=False, count=bwd)
    return {"forward": fwd, "backward": bwd}


BACKEND = TritonBackend()
"""The default instance (CUDA only): what ``backend="auto"`` may pick."""

"""Validation of ``masked_attention``'s arguments into :class:`~learnmask.ops.base.AttentionInputs`.

Every check raises an error that names the argument, what came and what was expected.

Mask conventions accepted (legend: B batch, Hq query heads, Q query length, K key length):

- None: attend everywhere;
- an :class:`~learnmask.masks.attention.AttentionMask` (checked against B, Q, K and the device);
- a **boolean keep-mask**, True = attend (SDPA's convention), broadcastable to (B, Hq, Q, K) from
  the right (2-d (Q, K), 3-d (Hq | 1, Q, K) or 4-d). The polarity cannot be detected: an
  "ignore"-style mask (True = masked, ``nn.MultiheadAttention``'s ``key_padding_mask``) must be
  inverted first, or given through :func:`learnmask.masks.attention.from_key_padding_mask`;
- an **additive float bias** of the same shapes: 0 = attend, ``-inf`` or ``finfo(dtype).min`` =
  masked; it gives exactly the result of the equivalent boolean keep-mask. Other values (score
  biases) are refused.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from learnmask.masks.attention import AttentionMask, bias_to_keep
from learnmask.masks.structure import MaskStructure
from learnmask.ops.base import AttentionInputs

__all__ = ["prepare_inputs", "check_dropout"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def prepare_inputs(q: Tensor, k: Tensor, v: Tensor, *, mask=None, head_gate: Tensor | None = None,
                   token_gate: Tensor | None = None, scale: float | None = None,
                   dropout_p: float = 0.0) -> AttentionInputs:
    """Check and normalize the arguments of ``masked_attention`` (see its docstring for shapes).

    Raises:
        TypeError: an argument is not a tensor / mask of an accepted kind or dtype.
        ValueError: shapes or devices do not fit together, gate values outside [0, 1], ``dropout_p``
            outside [0, 1).
    """
    _check_qkv(q, k, v)
    dropout_p = check_dropout(dropout_p)
    batch, heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float; got {scale!r}")
    mask, structure = _normalize_mask(mask, batch, heads, q_len, kv_len, q.device)
    token_gate = _check_gate(token_gate, "token_gate", [(batch, kv_len), (1, kv_len)], "(B, K)", q.device, True)
    head_gate = _check_gate(head_gate, "head_gate", [(heads,), (batch, heads)], "(Hq,) or (B, Hq)", q.device, False)
    return AttentionInputs(q=q, k=k, v=v, mask=mask, structure=structure, head_gate=head_gate,
                           token_gate=token_gate, scale=float(scale), dropout_p=dropout_p)


def check_dropout(dropout_p) -> float:
    """``dropout_p`` as a float in [0, 1).

    Raises:
        TypeError: not a real number (a bool or a tensor included).
        ValueError: outside [0, 1) or not finite.
    """
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float in [0, 1) (the probability of zeroing an attention weight); "
                        f"got {type(dropout_p).__name__} {dropout_p!r}")
    if not (math.isfinite(dropout_p) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be a float in [0, 1) (the probability of zeroing an attention weight; "
                         f"pass 0.0 in eval); got {dropout_p!r}")
    return float(dropout_p)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    names = ("q", "k", "v")
    legend = {"q": "(B, Hq, Q, D)", "k": "(B, Hkv, K, D)", "v": "(B, Hkv, K, Dv)"}
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor {legend[name]}; got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected 4 dims {legend[name]}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; expected one of float16, bfloat16, float32, float64")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got q {q.device}, k {k.device}, v {v.device}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in (B, Hkv, K)")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q has batch {q.shape[0]} but k has batch {k.shape[0]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads Hq={q.shape[1]} must be a multiple of key/value heads Hkv={k.shape[1]} "
                         "(grouped-query attention)")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q head dim {q.shape[3]} != k head dim {k.shape[3]}")


def _normalize_mask(mask, batch: int, heads: int, q_len: int, kv_len: int, device: torch.device):
    if mask is None:
        return None, MaskStructure()
    if isinstance(mask, AttentionMask):
        mask.check(batch, q_len, kv_len, device)
        structure = mask.structure()
        return mask, None if structure is None else _full_batch(structure, batch)
    if type(mask).__name__ == "BlockMask":
        raise TypeError("mask is a FlexAttention BlockMask; pass the AttentionMask (learnmask.masks.attention) it "
                        "was built from: masked_attention builds and caches BlockMasks itself")
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be None, an AttentionMask, a bool keep-mask or a float bias tensor; got "
                        f"{type(mask).__name__}")
    expected = (batch, heads, q_len, kv_len)
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but q is on {device}; move it with mask.to(q.device)")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"mask tensor has dtype {mask.dtype}; pass a bool keep-mask (True = attend) or an additive "
                        "float bias (0 / -inf). For a 0/1 padding attention_mask (1 = real token) use "
                        "learnmask.masks.attention.padding(attention_mask)")
    if not 2 <= mask.dim() <= 4 or any(
            m not in (1, e) for m, e in zip(mask.shape[::-1], expected[::-1])):
        raise ValueError(f"mask has shape {tuple(mask.shape)}; expected a keep-mask broadcastable to "
                         f"(B, Hq, Q, K) = {expected} (2-d (Q, K), 3-d or 4-d)")
    keep = mask if mask.dtype == torch.bool else bias_to_keep(mask)
    keep = keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape))
    return keep.expand(keep.shape[0], keep.shape[1], q_len, kv_len), None


def _full_batch(s: MaskStructure, batch: int) -> MaskStructure:
    """The structure with every per-batch tensor expanded to ``batch`` rows (contiguous)."""
    def grow(t: Tensor | None) -> Tensor | None:
        if t is None or t.shape[0] == batch:
            return t
        return t.expand(batch, *t.shape[1:]).contiguous()

    return dataclasses.replace(s, prefix_lengths=grow(s.prefix_lengths), q_document_ids=grow(s.q_document_ids),
                               kv_document_ids=grow(s.kv_document_ids), key_padding=grow(s.key_padding))


def _check_gate(gate: Tensor | None, name: str, shapes: list[tuple[int, ...]], legend: str,
                device: torch.device, unit_interval: bool) -> Tensor | None:
    if gate is None:
        return None
    if not isinstance(gate, Tensor) or not gate.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor {legend}; got "
                        f"{getattr(gate, 'dtype', type(gate).__name__)}")
    if tuple(gate.shape) not in shapes:
        raise ValueError(f"{name} has shape {tuple(gate.shape)}; expected {legend} = {shapes[0]}")
    if gate.device != device:
        raise ValueError(f"{name} is on {gate.device} but q is on {device}; move it with .to(q.device)")
    if gate.device.type != "meta":
        detached = gate.detach()
        if not bool(torch.isfinite(detached).all()):
            raise ValueError(f"{name} holds NaN or inf values")
        if unit_interval and bool(((detached < 0) | (detached > 1)).any()):
            raise ValueError(f"{name} values must lie in [0, 1] (a soft keep value per key; 0 removes the key); "
                             f"got min {detached.min().item():.4g}, max {detached.max().item():.4g}")
    return gate

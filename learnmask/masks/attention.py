"""Attention masks as predicates: causal, padding, sliding window, prefix-LM, documents, chunks and
user predicates, composed with ``&``, ``|`` and ``~``.

A mask is a ``mask_mod(b, h, q_idx, kv_idx) -> bool`` predicate in FlexAttention's convention
(Dong et al., 2024): True means query ``q_idx`` of batch ``b``, head ``h`` may attend to key
``kv_idx`` (the *keep* convention of ``scaled_dot_product_attention``'s boolean ``attn_mask``). The
predicate is written with tensor operations only, so it works both under FlexAttention's ``vmap``
(scalar indices) and with broadcasting index tensors (how :meth:`AttentionMask.keep` evaluates it).

Materializations, each for one call's sizes (B batch, H heads, Q query length, K key length):

- :meth:`AttentionMask.keep`: boolean keep-mask broadcastable to (B, H, Q, K);
- :meth:`AttentionMask.bias`: additive float bias, 0 where kept and exactly ``finfo(dtype).min``
  where masked (never ``-inf``; masks are combined as booleans and converted once, so no sum of two
  minima can overflow);
- :meth:`AttentionMask.block_mask`: a FlexAttention ``BlockMask``, cached per (B, H, Q, K, device,
  block size) on the mask object.

Masks holding per-batch tensors (padding, documents, prefix lengths) check them against every call
(batch size, lengths, device) and refuse a mismatch with a ``ValueError``: a mask built for other
lengths is never used silently. Positions are absolute; for Q != K the causal diagonal is top-left
aligned (query i sees keys 0..i), as in SDPA's ``is_causal``.

The structured constructors (all but :func:`from_mod`) take their predicate from a
:class:`~learnmask.masks.structure.MaskStructure`, where the semantics of each kind are written once;
:meth:`AttentionMask.structure` gives a mask's structure (what block-sparse kernels evaluate) when it
is a conjunction the structure can express, else None.
"""

from __future__ import annotations

import torch
from torch import Tensor

from learnmask.masks.attention_bias import add_biases, bias_to_keep, keep_to_bias
from learnmask.masks.attention_mask import AttentionMask, MaskMod
from learnmask.masks.attention_mask import Predicate as _Predicate
from learnmask.masks.structure import MaskStructure

__all__ = [
    "AttentionMask",
    "full",
    "causal",
    "sliding_window",
    "padding",
    "from_key_padding_mask",
    "prefix_lm",
    "document",
    "chunked",
    "from_mod",
    "keep_to_bias",
    "bias_to_keep",
    "add_biases",
]

# -- constructors -----------------------------------------------------------------------------

def full() -> AttentionMask:
    """Keep every (query, key) pair (the identity of ``&``)."""
    return _structured("full", lambda t: MaskStructure())


def causal() -> AttentionMask:
    """Causal mask: query i attends to keys j <= i (top-left aligned when Q != K, like SDPA's
    ``is_causal``; Vaswani et al., 2017)."""
    return _structured("causal", lambda t: MaskStructure(causal=True))


def sliding_window(window: int) -> AttentionMask:
    """Causal sliding window of ``window`` keys *including the query itself*: keep j when
    ``0 <= i - j < window`` (Beltagy et al., 2020, causal form). ``window=1`` attends to itself only.

    Raises:
        ValueError: ``window`` is not an int >= 1.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1 (keys including the query); got {window!r}")
    return _structured(f"sliding_window({window})", lambda t: MaskStructure(window=window))


def chunked(chunk_size: int) -> AttentionMask:
    """Chunked attention: keep j when i and j lie in the same chunk of ``chunk_size`` positions
    (``i // C == j // C``; bidirectional inside a chunk, combine with :func:`causal` for the
    causal form of Llama 4 style chunked attention).

    Raises:
        ValueError: ``chunk_size`` is not an int >= 1.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1; got {chunk_size!r}")
    return _structured(f"chunked({chunk_size})", lambda t: MaskStructure(chunk_size=chunk_size))


def padding(attention_mask: Tensor) -> AttentionMask:
    """Key padding from a Hugging Face style ``attention_mask`` (B, K): **1/True = real token**,
    0/False = padding. Padding keys are never attended to; queries are not masked (a padding
    query's output is computed and is the caller's to ignore).

    Use :func:`from_key_padding_mask` for the opposite polarity (True = ignore).

    Raises:
        ValueError: ``attention_mask`` is not 2-d or holds values other than 0 and 1.
    """
    am = _as_bool_2d(attention_mask, "attention_mask", "1 = real token, 0 = padding")
    return _structured("padding", lambda t: MaskStructure(key_padding=t["attention_mask"]),
                       {"attention_mask": am}, {"attention_mask": ("batch", "kv_len")})


def from_key_padding_mask(key_padding_mask: Tensor) -> AttentionMask:
    """Key padding from an ``nn.MultiheadAttention`` style ``key_padding_mask`` (B, K): **True =
    ignore this key** (padding), False = attend. Identical to ``padding(~key_padding_mask)``.

    Raises:
        ValueError: the tensor is not 2-d or holds values other than 0 and 1.
    """
    kpm = _as_bool_2d(key_padding_mask, "key_padding_mask", "True = ignore (padding)")
    return padding(~kpm)


def prefix_lm(prefix_lengths: Tensor | int) -> AttentionMask:
    """Prefix-LM (Raffel et al., 2020): keys of the prefix are visible to every query, the rest
    causally: keep j when ``j <= i or j < prefix_lengths[b]``.

    Args:
        prefix_lengths: (B,) ints >= 0, or one int for the whole batch.

    Raises:
        ValueError: not a 1-d integer tensor / int, or a negative length.
    """
    if isinstance(prefix_lengths, int) and not isinstance(prefix_lengths, bool):
        prefix_lengths = torch.tensor([prefix_lengths])
    if not isinstance(prefix_lengths, Tensor) or prefix_lengths.dim() != 1 or prefix_lengths.is_floating_point() \
            or prefix_lengths.dtype == torch.bool:
        raise ValueError(f"prefix_lengths must be an int or a 1-d integer tensor (B,); got {prefix_lengths!r}")
    if (prefix_lengths < 0).any():
        raise ValueError(f"prefix_lengths must be >= 0; got {prefix_lengths.tolist()}")
    lengths = prefix_lengths.to(torch.int64)
    return _structured("prefix_lm", lambda t: MaskStructure(causal=True, prefix_lengths=t["prefix_lengths"]),
                       {"prefix_lengths": lengths}, {"prefix_lengths": ("batch",)})


def document(document_ids: Tensor, kv_document_ids: Tensor | None = None) -> AttentionMask:
    """Packed sequences: keep pairs whose query and key belong to the same document.

    Args:
        document_ids: (B, Q) integer document id of each query position (and of each key
            position when ``kv_document_ids`` is None, which needs Q == K).
        kv_document_ids: (B, K) document ids of the keys, for Q != K.

    Combine with :func:`causal` for causal packing. Ids need not be sorted; block-sparse backends
    skip the most work when each document is one contiguous run (the usual packing).

    Raises:
        ValueError: ids are not 2-d integer tensors, or their batch sizes differ.
    """
    q_ids = _as_ids(document_ids, "document_ids")
    kv_ids = q_ids if kv_document_ids is None else _as_ids(kv_document_ids, "kv_document_ids")
    if kv_ids.shape[0] != q_ids.shape[0]:
        raise ValueError(f"document_ids batch {q_ids.shape[0]} != kv_document_ids batch {kv_ids.shape[0]}")

    return _structured("document", lambda t: MaskStructure(q_document_ids=t["q_document_ids"],
                                                           kv_document_ids=t["kv_document_ids"]),
                       {"q_document_ids": q_ids, "kv_document_ids": kv_ids},
                       {"q_document_ids": ("batch", "q_len"), "kv_document_ids": ("batch", "kv_len")})


def from_mod(mask_mod: MaskMod, *, name: str | None = None, per_batch: bool = True,
             per_head: bool = True) -> AttentionMask:
    """A user predicate ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = attend), written with
    tensor operations only (FlexAttention's rule), e.g. ``lambda b, h, q, k: (q - k).abs() <= 4``.

    Args:
        per_batch / per_head: set False when the predicate ignores ``b`` / ``h``; materialized
            masks and block masks are then built once for the whole batch / all heads.

    It has no :class:`MaskStructure`, so kernels that need one refuse it. Tensors the predicate
    captures are not checked against the call's sizes: that is the caller's responsibility.
    """
    if not callable(mask_mod):
        raise TypeError(f"mask_mod must be callable (b, h, q_idx, kv_idx) -> bool tensor; got {mask_mod!r}")
    label = name or getattr(mask_mod, "__name__", "user")
    return _Predicate(label, lambda t: mask_mod, {}, {}, None, per_head=per_head, per_batch=per_batch)


def _structured(name: str, structure, tensors: dict[str, Tensor] | None = None,
                dims: dict[str, tuple[str, ...]] | None = None) -> AttentionMask:
    """A leaf mask whose predicate is its structure's (:meth:`MaskStructure.mask_mod`: the semantics are
    written once, in :mod:`learnmask.masks.structure`)."""
    return _Predicate(name, None, tensors or {}, dims or {}, structure)


# -- argument checks ----------------------------------------------------------------------------

def _as_bool_2d(x: Tensor, name: str, convention: str) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"{name} must be a 2-d tensor (B, K) ({convention}); got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if x.dtype == torch.bool:
        return x
    if x.is_complex() or not bool(((x == 0) | (x == 1)).all()):
        raise ValueError(f"{name} must hold only 0/1 or bools ({convention}); got values "
                         f"{sorted(set(x.flatten().tolist()))[:5]}")
    return x.to(torch.bool)


def _as_ids(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 2 or x.is_floating_point() or x.dtype == torch.bool:
        raise ValueError(f"{name} must be a 2-d integer tensor (B, S) of document ids; got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    return x.to(torch.int64)

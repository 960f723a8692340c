"""The structured attention masks, their semantics written once, and their conjunction.

A :class:`MaskStructure` is a *conjunction* of known predicates that block-sparse kernels can
evaluate from a few numbers and small tensors (a mask built from a user predicate has none). Every
field that is set is a condition a (query, key) pair must meet to be kept (keep convention: True =
the query may attend to the key, as SDPA's boolean ``attn_mask``).

The semantics, the only place they are written in Python. Two kinds of condition:

* **position conditions** keep, for query row ``i`` of batch row ``b``, one interval of keys
  ``[lo(i), hi(i))`` (:meth:`MaskStructure.position_bounds`); ``lo`` and ``hi`` never decrease with
  ``i`` (block classification relies on it):

  ====================  ================================  =========================================
  field                 keys kept                         reference
  ====================  ================================  =========================================
  ``causal``            ``[0, i + 1)``                    Vaswani et al., 2017
  ``+ prefix_lengths``  ``[0, max(i + 1, P[b]))``         prefix-LM, Raffel et al., 2020
  ``window`` W          ``[i - W + 1, i + 1)``            causal sliding window, Beltagy et al., 2020
  ``chunk_size`` C      ``[C * (i // C), C * (i // C) + C)``  chunked attention
  ====================  ================================  =========================================

* **key conditions** (:meth:`MaskStructure.key_condition`): ``key_padding[b, j]`` (True = real key,
  the Hugging Face ``attention_mask`` convention) and documents ``q_document_ids[b, i] ==
  kv_document_ids[b, j]`` (sequence packing).

A pair is kept when every condition keeps it (:meth:`MaskStructure.mask_mod`). Everything else is
derived from these two methods: the ``mask_mod`` of the constructors in
:mod:`learnmask.masks.attention` (what FlexAttention and the dense paths evaluate), the dense
keep-mask (:meth:`MaskStructure.keep`, the spec kernels are tested against), rectangles of it
(:meth:`MaskStructure.tile`), and in :mod:`learnmask.masks.structure_blocks` the per-row key
intervals and the exact per-tile block states. The one other statement of the position conditions is
the Triton kernel's ``_row_bounds`` / ``_col_bounds`` (:mod:`learnmask.ops.triton_kernels`, which
cannot call Python); its launch parameters come from :meth:`MaskStructure.kernel_scalars` and
:func:`learnmask.masks.structure_blocks.key_spans`, and its tests compare it with :meth:`keep`.

Positions are absolute indices from the start of the sequence; for Q != K the causal diagonal is
top-left aligned (query i sees keys 0..i), as ``scaled_dot_product_attention(is_causal=True)``.

Legend: B batch (1 = shared by the batch), Q query length, K key length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = ["MaskStructure", "conjoin", "MaskMod"]

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def _per_batch(t: Tensor) -> Callable[[Tensor], Tensor]:
    """``b -> t[b]`` of a (B,) tensor, or ``t[0]`` for every b when B == 1 (shared by the batch)."""
    if t.shape[0] == 1:
        value = t[0]
        return lambda b: value
    return lambda b: t[b]


def _per_position(t: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """``(b, i) -> t[b, i]`` of a (B, L) tensor (indices broadcast together), or ``t[0, i]`` when B == 1."""
    if t.shape[0] == 1:
        row = t[0]
        return lambda b, i: row[i]
    return lambda b, i: t[b, i]


@dataclass(frozen=True, eq=False)
class MaskStructure:
    """A conjunction of structured attention predicates (semantics in the module docstring).

    Fields (each ``None``/``False`` means "no condition"):

    - ``causal``: keep ``kv_idx <= q_idx``.
    - ``prefix_lengths``: (B,) int64. Only with ``causal``: keep ``kv_idx <= q_idx or kv_idx <
      prefix_lengths[b]``.
    - ``window``: int W >= 1: keep ``0 <= q_idx - kv_idx < W`` (the query itself included).
    - ``chunk_size``: int C >= 1: keep ``q_idx // C == kv_idx // C``.
    - ``q_document_ids`` / ``kv_document_ids``: (B, Q) and (B, K) int64, both or neither: keep pairs
      in the same document.
    - ``key_padding``: (B, K) bool, True for real keys: padding keys are never kept.

    Raises:
        ValueError: ``prefix_lengths`` without ``causal``, a window or chunk size that is not an
            int >= 1, or only one of the two document id tensors.
    """

    causal: bool = False
    prefix_lengths: Tensor | None = None
    window: int | None = None
    chunk_size: int | None = None
    q_document_ids: Tensor | None = None
    kv_document_ids: Tensor | None = None
    key_padding: Tensor | None = None

    def __post_init__(self) -> None:
        if self.prefix_lengths is not None and not self.causal:
            raise ValueError("prefix_lengths needs causal=True (prefix-LM relaxes the causal mask)")
        if self.window is not None and (isinstance(self.window, bool) or not isinstance(self.window, int)
                                        or self.window < 1):
            raise ValueError(f"window must be an int >= 1 (keys including the query); got {self.window!r}")
        if self.chunk_size is not None and (isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int)
                                            or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be an int >= 1; got {self.chunk_size!r}")
        if (self.q_document_ids is None) != (self.kv_document_ids is None):
            raise ValueError("q_document_ids and kv_document_ids must be given together")

    # -- what the structure holds --------------------------------------------------------------
    @property
    def tensors(self) -> tuple[Tensor, ...]:
        """The per-batch tensors it holds (prefix lengths, document ids, key padding)."""
        return tuple(t for t in (self.prefix_lengths, self.q_document_ids, self.kv_document_ids, self.key_padding)
                     if t is not None)

    @property
    def batch(self) -> int:
        """Batch size of its per-batch tensors (1 when it holds none or all have batch 1)."""
        return max((t.shape[0] for t in self.tensors), default=1)

    @property
    def device(self) -> torch.device:
        """Device of its tensors (CPU when it holds none)."""
        return self.tensors[0].device if self.tensors else torch.device("cpu")

    @property
    def has_position_condition(self) -> bool:
        return self.causal or self.window is not None or self.chunk_size is not None

    @property
    def has_key_condition(self) -> bool:
        return self.key_padding is not None or self.q_document_ids is not None

    @property
    def is_pure_causal(self) -> bool:
        """Exactly the causal mask, nothing else (what SDPA's ``is_causal=True`` computes for Q == K)."""
        return self.causal and self.prefix_lengths is None and self.window is None and self.chunk_size is None \
            and not self.has_key_condition

    @property
    def is_empty(self) -> bool:
        """No condition at all: every pair is kept."""
        return not (self.has_position_condition or self.has_key_condition)

    # -- the semantics -------------------------------------------------------------------------
    def position_bounds(self) -> Callable[[Tensor, Tensor], tuple[Tensor | None, Tensor | None]]:
        """``(b, q_idx) -> (lo, hi)``: the keys ``[lo, hi)`` query ``q_idx`` of batch row ``b`` keeps by
        position (None: unbounded on that side). Index tensors broadcast (or are scalars under vmap)."""
        causal, window, chunk = self.causal, self.window, self.chunk_size
        prefix = None if self.prefix_lengths is None else _per_batch(self.prefix_lengths)

        def bounds(b: Tensor, q_idx: Tensor) -> tuple[Tensor | None, Tensor | None]:
            lo = hi = None
            if causal:
                hi = q_idx + 1 if prefix is None else torch.maximum(q_idx + 1, prefix(b))
            if window is not None:
                lo = q_idx - (window - 1)
                hi = q_idx + 1 if hi is None else torch.minimum(hi, q_idx + 1)
            if chunk is not None:
                start = torch.div(q_idx, chunk, rounding_mode="floor") * chunk
                lo = start if lo is None else torch.maximum(lo, start)
                hi = start + chunk if hi is None else torch.minimum(hi, start + chunk)
            return lo, hi

        return bounds

    def key_condition(self) -> Callable[[Tensor, Tensor, Tensor], Tensor] | None:
        """``(b, q_idx, kv_idx) -> bool`` of the key conditions (padding, documents), or None."""
        real = None if self.key_padding is None else _per_position(self.key_padding.to(torch.bool))
        q_docs = None if self.q_document_ids is None else _per_position(self.q_document_ids)
        kv_docs = None if self.kv_document_ids is None else _per_position(self.kv_document_ids)
        if real is None and q_docs is None:
            return None

        def condition(b: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            if q_docs is None:
                return real(b, kv_idx)
            same = q_docs(b, q_idx) == kv_docs(b, kv_idx)
            return same if real is None else same & real(b, kv_idx)

        return condition

    def mask_mod(self) -> MaskMod:
        """The predicate ``(b, h, q_idx, kv_idx) -> bool`` (True = keep) in FlexAttention's convention,
        written with tensor operations only (works under ``vmap`` and with broadcasting indices)."""
        bounds = self.position_bounds() if self.has_position_condition else None
        condition = self.key_condition()

        def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            keep = (q_idx >= 0) & (kv_idx >= 0)
            if bounds is not None:
                lo, hi = bounds(b, q_idx)
                if lo is not None:
                    keep = keep & (kv_idx >= lo)
                if hi is not None:
                    keep = keep & (kv_idx < hi)
            if condition is not None:
                keep = keep & condition(b, q_idx, kv_idx)
            return keep

        return mask_mod

    # -- dense evaluation ----------------------------------------------------------------------
    def keep(self, q_len: int, kv_len: int, *, batch: int = 1, device: torch.device | str = "cpu") -> Tensor:
        """Dense boolean keep-mask of shape (B, 1, Q, K) with B = ``batch`` — the spec kernels are tested
        against. Allocates B·Q·K booleans: for tests and small shapes."""
        keep = self.tile(0, q_len, 0, kv_len, device=device, empty_is_none=False)
        return keep.expand(max(batch, keep.shape[0]), 1, q_len, kv_len)

    def tile(self, q0: int, q1: int, k0: int, k1: int, device: torch.device | str | None = None, *,
             empty_is_none: bool = True) -> Tensor | None:
        """Keep-mask of queries [q0, q1) × keys [k0, k1): bool (B | 1, 1, q1 - q0, k1 - k0), or None when
        the structure has no condition (everything kept) and ``empty_is_none``."""
        if empty_is_none and self.is_empty:
            return None
        device = torch.device(device) if device is not None else self.device
        s = self if device == self.device else self.to(device)
        b = torch.arange(self.batch if s.tensors else 1, device=device).view(-1, 1, 1, 1)
        q = torch.arange(q0, q1, device=device).view(1, 1, -1, 1)
        k = torch.arange(k0, k1, device=device).view(1, 1, 1, -1)
        keep = s.mask_mod()(b, torch.zeros((), dtype=torch.long, device=device), q, k)
        return keep.expand(b.shape[0], 1, q1 - q0, k1 - k0)

    def to(self, device: torch.device | str) -> MaskStructure:
        """The same structure with its tensors on ``device``."""
        def move(t):
            return None if t is None else t.to(device)
        return MaskStructure(self.causal, move(self.prefix_lengths), self.window, self.chunk_size,
                             move(self.q_document_ids), move(self.kv_document_ids), move(self.key_padding))

    def kernel_scalars(self, q_len: int, kv_len: int) -> dict[str, int]:
        """The position conditions as the integers a compiled kernel takes: ``causal`` (0/1),
        ``window`` and ``chunk`` (0 = none; clipped to Q + K, beyond which they change nothing).
        ``prefix_lengths`` is passed as a tensor."""
        limit = q_len + kv_len
        return {"causal": int(self.causal), "window": 0 if self.window is None else min(self.window, limit),
                "chunk": 0 if self.chunk_size is None else min(self.chunk_size, limit)}


def conjoin(a: MaskStructure, b: MaskStructure) -> MaskStructure | None:
    """Structure of ``a & b`` (its keep-mask is ``a.keep() & b.keep()`` for every size), or None when
    the fields cannot express it.

    Rules: causal conditions meet (a strict causal mask wins over a prefix-LM one; two prefix-LM
    masks keep the shorter prefix per batch row); windows take the smaller W; chunks take the
    smaller size when it divides the larger (finer chunks refine coarser ones; else None); key
    paddings are and-ed; two different document partitions give None. Per-batch tensors broadcast
    over the batch (a batch of 1 is shared).
    """
    causal = a.causal or b.causal
    prefix: Tensor | None = None
    if a.causal and b.causal:
        if a.prefix_lengths is not None and b.prefix_lengths is not None:
            prefix = torch.minimum(a.prefix_lengths, b.prefix_lengths.to(a.prefix_lengths.device))
    elif a.causal:
        prefix = a.prefix_lengths
    elif b.causal:
        prefix = b.prefix_lengths

    windows = [w for w in (a.window, b.window) if w is not None]
    window = min(windows) if windows else None

    chunk = a.chunk_size
    if a.chunk_size is not None and b.chunk_size is not None:
        small, large = sorted((a.chunk_size, b.chunk_size))
        if large % small != 0:
            return None
        chunk = small
    elif chunk is None:
        chunk = b.chunk_size

    q_docs, kv_docs = a.q_document_ids, a.kv_document_ids
    if b.q_document_ids is not None:
        if q_docs is not None and not (q_docs is b.q_document_ids and kv_docs is b.kv_document_ids):
            same = (q_docs.shape == b.q_document_ids.shape and kv_docs.shape == b.kv_document_ids.shape
                    and bool((q_docs == b.q_document_ids).all()) and bool((kv_docs == b.kv_document_ids).all()))
            if not same:
                return None
        q_docs, kv_docs = b.q_document_ids, b.kv_document_ids

    padding = a.key_padding
    if b.key_padding is not None:
        padding = b.key_padding if padding is None else padding & b.key_padding.to(padding.device)

    return MaskStructure(causal=causal, prefix_lengths=prefix, window=window, chunk_size=chunk,
                         q_document_ids=q_docs, kv_document_ids=kv_docs, key_padding=padding)

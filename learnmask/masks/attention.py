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
aligned (query i sees keys 0..i), as in SDPA's ``is_causal`` and :mod:`learnmask.ops.structure`.

:meth:`AttentionMask.structure` gives the mask as a :class:`~learnmask.ops.structure.MaskStructure`
(what block-sparse kernels evaluate) when it is a conjunction the structure can express, else None.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from learnmask.masks.attention_algebra import conjoin
from learnmask.masks.attention_bias import add_biases, bias_to_keep, keep_to_bias
from learnmask.ops.structure import MaskStructure

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

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
# Which call size each dim of a mask's tensor must equal ("batch" may also be 1: shared).
_Dims = tuple[str, ...]


class AttentionMask:
    """Base of all attention masks: a predicate plus its materializations.

    Attributes:
        mask_mod: ``(b, h, q_idx, kv_idx) -> bool tensor``, True = attend (FlexAttention's
            ``mask_mod`` signature). A plain function (a closure over the mask's tensors), so
            ``torch.compile`` sees a new mask of the same kind as the same code.
        per_batch: whether the predicate depends on ``b`` (False: one mask for the whole batch).
        per_head: whether it depends on ``h``.
        name: a short description, e.g. ``"causal & padding"``.
    """

    mask_mod: MaskMod
    per_batch: bool = False
    per_head: bool = False
    name: str = "mask"

    def __init__(self) -> None:
        self._memo: dict = {}

    # -- what subclasses define --------------------------------------------------------------
    def structure(self) -> MaskStructure | None:
        """The mask as a conjunction of structured predicates, or None when it is not one."""
        return None

    def check(self, batch: int, q_len: int, kv_len: int, device: torch.device | str | None = None) -> None:
        """Raise ``ValueError`` if this mask cannot be used for a call of these sizes on ``device``."""

    def to(self, device: torch.device | str) -> AttentionMask:
        """The same mask with its tensors on ``device`` (itself when it holds none)."""
        return self

    @property
    def device(self) -> torch.device | None:
        """Device of the tensors this mask holds (None when it holds none)."""
        return None

    # -- algebra -------------------------------------------------------------------------------
    def __and__(self, other: AttentionMask) -> AttentionMask:
        return _Combined("and", (self, _as_mask(other)))

    def __or__(self, other: AttentionMask) -> AttentionMask:
        return _Combined("or", (self, _as_mask(other)))

    def __invert__(self) -> AttentionMask:
        return _Combined("not", (self,))

    def __repr__(self) -> str:
        return f"AttentionMask({self.name})"

    # -- materializations ----------------------------------------------------------------------
    def keep(self, batch: int, heads: int, q_len: int, kv_len: int,
             device: torch.device | str | None = None) -> Tensor:
        """Boolean keep-mask (True = attend) of shape (B', H', Q, K).

        B' is ``batch`` when the mask depends on the batch index, else 1; H' likewise for heads,
        so the result broadcasts over (B, H, Q, K) without allocating what it does not need.

        Raises:
            ValueError: the mask's tensors do not fit (batch, Q, K) or live on another device.
        """
        device = self._call_device(device)
        self.check(batch, q_len, kv_len, device)
        b_len, h_len = (batch if self.per_batch else 1), (heads if self.per_head else 1)
        b = torch.arange(b_len, device=device).view(-1, 1, 1, 1)
        h = torch.arange(h_len, device=device).view(1, -1, 1, 1)
        q = torch.arange(q_len, device=device).view(1, 1, -1, 1)
        k = torch.arange(kv_len, device=device).view(1, 1, 1, -1)
        out = self.mask_mod(b, h, q, k)
        if not isinstance(out, Tensor) or out.dtype != torch.bool:
            raise TypeError(f"mask_mod of {self.name} returned {type(out).__name__} "
                            f"{getattr(out, 'dtype', '')}; it must return a bool tensor (True = attend)")
        return out.expand(b_len, h_len, q_len, kv_len)

    def bias(self, batch: int, heads: int, q_len: int, kv_len: int, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> Tensor:
        """Additive bias of shape (B', H', Q, K): 0 where kept, exactly ``finfo(dtype).min`` where
        masked (see :func:`keep_to_bias`). Raises like :meth:`keep`."""
        return keep_to_bias(self.keep(batch, heads, q_len, kv_len, device), dtype)

    def block_mask(self, batch: int, heads: int, q_len: int, kv_len: int,
                   device: torch.device | str | None = None, block_size: int = 128):
        """FlexAttention ``BlockMask`` for these sizes, built once and cached on this mask.

        Its batch and head sizes are 1 where the mask does not depend on them (FlexAttention
        broadcasts them). Structured masks are classified block by block from their
        :class:`MaskStructure` without evaluating every (query, key) pair; other masks go through
        ``create_block_mask``. Raises like :meth:`keep`.
        """
        from learnmask.masks.attention_blocks import build_block_mask

        device = torch.device(self._call_device(device))
        self.check(batch, q_len, kv_len, device)
        b_len, h_len = (batch if self.per_batch else 1), (heads if self.per_head else 1)
        key = ("block_mask", b_len, h_len, q_len, kv_len, str(device), block_size)
        return self.cached(key, lambda: build_block_mask(self, b_len, h_len, q_len, kv_len, device, block_size))

    def cached(self, key, build):
        """``build()`` memoized on this mask under ``key`` (hashable; at most 8 entries, oldest dropped).

        Backends use it for work that depends only on the mask and the call's sizes (a BlockMask, a
        dense keep-mask, a block plan), so the layers of a model sharing one mask build it once.
        Values are shared: do not modify them in place.
        """
        if key not in self._memo:
            if len(self._memo) >= 8:
                self._memo.pop(next(iter(self._memo)))
            self._memo[key] = build()
        return self._memo[key]

    def _call_device(self, device: torch.device | str | None) -> torch.device:
        if device is not None:
            return torch.device(device)
        return self.device if self.device is not None else torch.device("cpu")


def _as_mask(other) -> AttentionMask:
    if not isinstance(other, AttentionMask):
        raise TypeError(f"can only combine an AttentionMask with another AttentionMask; got {type(other).__name__}"
                        " (wrap a predicate with from_mod(fn))")
    return other


class _Predicate(AttentionMask):
    """A leaf mask: a predicate built from named tensors, their expected sizes and a structure."""

    def __init__(self, name: str, build: Callable[[dict[str, Tensor]], MaskMod], tensors: dict[str, Tensor],
                 dims: dict[str, _Dims], structure: Callable[[dict[str, Tensor]], MaskStructure] | None,
                 per_head: bool = False, per_batch: bool | None = None) -> None:
        super().__init__()
        self.name, self._build, self._tensors, self._dims, self._structure = name, build, tensors, dims, structure
        devices = {t.device for t in tensors.values()}
        if len(devices) > 1:
            raise ValueError(f"{name} mask: its tensors are on different devices {sorted(map(str, devices))}")
        self._device = devices.pop() if devices else None
        self.per_head = per_head
        self.per_batch = per_batch if per_batch is not None else any(
            dims[n][0] == "batch" and t.shape[0] > 1 for n, t in tensors.items())
        self.mask_mod = build(tensors)

    @property
    def device(self) -> torch.device | None:
        return self._device

    def structure(self) -> MaskStructure | None:
        return None if self._structure is None else self._structure(self._tensors)

    def to(self, device: torch.device | str) -> AttentionMask:
        if not self._tensors:
            return self
        moved = {n: t.to(device) for n, t in self._tensors.items()}
        return _Predicate(self.name, self._build, moved, self._dims, self._structure, self.per_head, self.per_batch)

    def check(self, batch: int, q_len: int, kv_len: int, device: torch.device | str | None = None) -> None:
        sizes = {"batch": batch, "q_len": q_len, "kv_len": kv_len}
        for tensor_name, dims in self._dims.items():
            t = self._tensors[tensor_name]
            expected = tuple(sizes[d] for d in dims)
            ok = t.dim() == len(dims) and all(
                t.shape[i] == sizes[d] or (d == "batch" and t.shape[i] == 1) for i, d in enumerate(dims))
            if not ok:
                raise ValueError(
                    f"{self.name} mask: {tensor_name} has shape {tuple(t.shape)}; this call needs "
                    f"({', '.join(dims)}) = {expected} (batch may be 1). A mask holding per-batch tensors "
                    "is built for one batch; build a new one for these sizes")
        if device is not None and self._device is not None and self._device != torch.device(device):
            raise ValueError(f"{self.name} mask: its tensors are on {self._device} but the attention inputs are "
                             f"on {torch.device(device)}; move it with mask.to(device)")


class _Combined(AttentionMask):
    """``&``, ``|`` of two masks or ``~`` of one, evaluated elementwise on the booleans."""

    def __init__(self, op: str, children: tuple[AttentionMask, ...]) -> None:
        super().__init__()
        self.op, self.children = op, children
        self.per_batch = any(c.per_batch for c in children)
        self.per_head = any(c.per_head for c in children)
        devices = {c.device for c in children if c.device is not None}
        if len(devices) > 1:
            raise ValueError(f"cannot combine masks on different devices {sorted(map(str, devices))}; "
                             "move them with mask.to(device) first")
        self._device = devices.pop() if devices else None
        mods = [c.mask_mod for c in children]
        if op == "not":
            self.name = f"~({children[0].name})"
            inner = mods[0]
            self.mask_mod = lambda b, h, q_idx, kv_idx: ~inner(b, h, q_idx, kv_idx)
        else:
            first, second = mods
            symbol = "&" if op == "and" else "|"
            self.name = f"({children[0].name} {symbol} {children[1].name})"
            if op == "and":
                self.mask_mod = lambda b, h, q_idx, kv_idx: first(b, h, q_idx, kv_idx) & second(b, h, q_idx, kv_idx)
            else:
                self.mask_mod = lambda b, h, q_idx, kv_idx: first(b, h, q_idx, kv_idx) | second(b, h, q_idx, kv_idx)

    @property
    def device(self) -> torch.device | None:
        return self._device

    def structure(self) -> MaskStructure | None:
        if self.op != "and":
            return None
        parts = [c.structure() for c in self.children]
        if any(p is None for p in parts):
            return None
        return conjoin(parts[0], parts[1])

    def check(self, batch: int, q_len: int, kv_len: int, device: torch.device | str | None = None) -> None:
        for child in self.children:
            child.check(batch, q_len, kv_len, device)

    def to(self, device: torch.device | str) -> AttentionMask:
        return _Combined(self.op, tuple(c.to(device) for c in self.children))


# -- constructors -----------------------------------------------------------------------------

def full() -> AttentionMask:
    """Keep every (query, key) pair (the identity of ``&``)."""
    return _Predicate("full", lambda t: lambda b, h, q_idx, kv_idx: (q_idx >= 0) & (kv_idx >= 0), {}, {},
                      lambda t: MaskStructure())


def causal() -> AttentionMask:
    """Causal mask: query i attends to keys j <= i (top-left aligned when Q != K, like SDPA's
    ``is_causal``; Vaswani et al., 2017)."""
    return _Predicate("causal", lambda t: lambda b, h, q_idx, kv_idx: kv_idx <= q_idx, {}, {},
                      lambda t: MaskStructure(causal=True))


def sliding_window(window: int) -> AttentionMask:
    """Causal sliding window of ``window`` keys *including the query itself*: keep j when
    ``0 <= i - j < window`` (Beltagy et al., 2020, causal form). ``window=1`` attends to itself only.

    Raises:
        ValueError: ``window`` is not an int >= 1.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1 (keys including the query); got {window!r}")

    def build(t):
        def mod(b, h, q_idx, kv_idx):
            d = q_idx - kv_idx
            return (d >= 0) & (d < window)
        return mod

    return _Predicate(f"sliding_window({window})", build, {}, {}, lambda t: MaskStructure(window=window))


def chunked(chunk_size: int) -> AttentionMask:
    """Chunked attention: keep j when i and j lie in the same chunk of ``chunk_size`` positions
    (``i // C == j // C``; bidirectional inside a chunk, combine with :func:`causal` for the
    causal form of Llama 4 style chunked attention).

    Raises:
        ValueError: ``chunk_size`` is not an int >= 1.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1; got {chunk_size!r}")
    return _Predicate(f"chunked({chunk_size})",
                      lambda t: lambda b, h, q_idx, kv_idx: (q_idx // chunk_size) == (kv_idx // chunk_size),
                      {}, {}, lambda t: MaskStructure(chunk_size=chunk_size))


def padding(attention_mask: Tensor) -> AttentionMask:
    """Key padding from a Hugging Face style ``attention_mask`` (B, K): **1/True = real token**,
    0/False = padding. Padding keys are never attended to; queries are not masked (a padding
    query's output is computed and is the caller's to ignore).

    Use :func:`from_key_padding_mask` for the opposite polarity (True = ignore).

    Raises:
        ValueError: ``attention_mask`` is not 2-d or holds values other than 0 and 1.
    """
    am = _as_bool_2d(attention_mask, "attention_mask", "1 = real token, 0 = padding")

    def build(t):
        am = t["attention_mask"]
        if am.shape[0] == 1:
            row = am[0]
            return lambda b, h, q_idx, kv_idx: row[kv_idx]
        return lambda b, h, q_idx, kv_idx: am[b, kv_idx]

    return _Predicate("padding", build, {"attention_mask": am}, {"attention_mask": ("batch", "kv_len")},
                      lambda t: MaskStructure(key_padding=t["attention_mask"]))


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

    def build(t):
        p = t["prefix_lengths"]
        if p.shape[0] == 1:
            p0 = p[0]
            return lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) | (kv_idx < p0)
        return lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) | (kv_idx < p[b])

    return _Predicate("prefix_lm", build, {"prefix_lengths": lengths}, {"prefix_lengths": ("batch",)},
                      lambda t: MaskStructure(causal=True, prefix_lengths=t["prefix_lengths"]))


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

    def build(t):
        qd, kd = t["q_document_ids"], t["kv_document_ids"]
        if qd.shape[0] == 1:
            q0, k0 = qd[0], kd[0]
            return lambda b, h, q_idx, kv_idx: q0[q_idx] == k0[kv_idx]
        return lambda b, h, q_idx, kv_idx: qd[b, q_idx] == kd[b, kv_idx]

    return _Predicate("document", build, {"q_document_ids": q_ids, "kv_document_ids": kv_ids},
                      {"q_document_ids": ("batch", "q_len"), "kv_document_ids": ("batch", "kv_len")},
                      lambda t: MaskStructure(q_document_ids=t["q_document_ids"],
                                              kv_document_ids=t["kv_document_ids"]))


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

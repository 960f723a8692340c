"""The :class:`AttentionMask` object and its algebra (``&``, ``|``, ``~``): a ``mask_mod`` predicate
with the tensors it reads, checked against every call's sizes, materialized as a keep-mask, an
additive bias or a FlexAttention ``BlockMask`` (cached), and described by a
:class:`~learnmask.masks.structure.MaskStructure` when it is a conjunction the structure can express.

The constructors (causal, padding, sliding window, ...) and the conventions are in
:mod:`learnmask.masks.attention`, which re-exports :class:`AttentionMask`.

Legend: B batch, H heads, Q query length, K key length.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from learnmask.masks.attention_bias import keep_to_bias
from learnmask.masks.structure import MaskMod, MaskStructure, conjoin

__all__ = ["AttentionMask", "MaskMod", "Predicate"]

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


class Predicate(AttentionMask):
    """A leaf mask: a predicate built from named tensors, their expected sizes and a structure
    (what the constructors of :mod:`learnmask.masks.attention` return).

    Args:
        name: shown in errors and ``repr`` (e.g. ``"sliding_window(128)"``).
        build: ``tensors -> mask_mod``, or None to use the structure's (``structure(tensors).mask_mod()``).
        tensors: name -> tensor the predicate reads (say, ``attention_mask`` ``(B, K)``); each is
            copied, so changing the caller's tensor afterwards changes neither the mask nor what
            it has cached (every backend sees the mask as it was built).
        dims: name -> the call size each of its dims must equal (``"batch"``, ``"q_len"``,
            ``"kv_len"``; batch may also be 1).
        structure: ``tensors -> MaskStructure``, or None when the predicate has none.
        per_head: the predicate depends on the head index.
        per_batch: it depends on the batch index (default: a batch-sized tensor with B > 1).

    Raises:
        ValueError: tensors on different devices.
    """

    def __init__(self, name: str, build: Callable[[dict[str, Tensor]], MaskMod] | None, tensors: dict[str, Tensor],
                 dims: dict[str, _Dims], structure: Callable[[dict[str, Tensor]], MaskStructure] | None,
                 per_head: bool = False, per_batch: bool | None = None) -> None:
        super().__init__()
        tensors = {n: t.detach().clone() for n, t in tensors.items()}
        self.name, self._build, self._tensors, self._dims, self._structure = name, build, tensors, dims, structure
        devices = {t.device for t in tensors.values()}
        if len(devices) > 1:
            raise ValueError(f"{name} mask: its tensors are on different devices {sorted(map(str, devices))}")
        self._device = devices.pop() if devices else None
        self.per_head = per_head
        self.per_batch = per_batch if per_batch is not None else any(
            dims[n][0] == "batch" and t.shape[0] > 1 for n, t in tensors.items())
        self.mask_mod = structure(tensors).mask_mod() if build is None else build(tensors)

    @property
    def device(self) -> torch.device | None:
        return self._device

    def structure(self) -> MaskStructure | None:
        return None if self._structure is None else self._structure(self._tensors)

    def to(self, device: torch.device | str) -> AttentionMask:
        if not self._tensors:
            return self
        moved = {n: t.to(device) for n, t in self._tensors.items()}
        return Predicate(self.name, self._build, moved, self._dims, self._structure, self.per_head, self.per_batch)

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

"""The structured attention masks a compiled kernel can evaluate from a few numbers and tensors.

A :class:`MaskStructure` is a *conjunction* of known predicates. Kernels that cannot call a Python
``mask_mod`` (the Triton kernel, block-sparse paths) read one of these instead: every field that is
set is a condition a (query, key) pair must meet to be kept. A mask built from a user predicate has
no structure; kernels that need one refuse it and say so.

Conventions (the same as ``learnmask.masks.attention`` and SDPA): a *keep* value True means the
query may attend to the key. Positions are absolute indices from the start of the sequence; for
Q != K the causal diagonal is top-left aligned (query i sees keys 0..i), as in
``scaled_dot_product_attention(is_causal=True)`` and FlexAttention's ``q_idx >= kv_idx``.

Legend: B batch, Q query length, K key length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class MaskStructure:
    """A conjunction of structured attention predicates.

    Fields (each ``None``/``False`` means "no condition"):

    - ``causal``: keep ``kv_idx <= q_idx``.
    - ``prefix_lengths``: (B,) int64. Only with ``causal``: the causal condition becomes
      ``kv_idx <= q_idx or kv_idx < prefix_lengths[b]`` (prefix-LM, Raffel et al., 2020).
    - ``window``: int W >= 1. Sliding window of W keys *including the query itself*:
      keep ``0 <= q_idx - kv_idx < W`` (implies causal; Beltagy et al., 2020 style, causal form).
    - ``chunk_size``: int C >= 1. Keep ``q_idx // C == kv_idx // C`` (chunked attention).
    - ``q_document_ids`` / ``kv_document_ids``: (B, Q) and (B, K) int64. Keep pairs in the same
      document (sequence packing). Both set or both None.
    - ``key_padding``: (B, K) bool, True for real keys (the ``attention_mask`` convention of
      Hugging Face tokenizers: 1 = real token). Padding keys are never kept.
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
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"window must be an int >= 1 (keys including the query); got {self.window!r}")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be an int >= 1; got {self.chunk_size!r}")
        if (self.q_document_ids is None) != (self.kv_document_ids is None):
            raise ValueError("q_document_ids and kv_document_ids must be given together")

    def keep(self, q_len: int, kv_len: int, *, batch: int = 1, device: torch.device | str = "cpu") -> Tensor:
        """Dense boolean keep-mask of shape (B, 1, Q, K) — the spec kernels are tested against.

        Allocates B·Q·K booleans: for tests and small shapes, not for block-sparse paths.
        """
        q = torch.arange(q_len, device=device)[:, None]
        k = torch.arange(kv_len, device=device)[None, :]
        keep = torch.ones(batch, 1, q_len, kv_len, dtype=torch.bool, device=device)
        if self.causal:
            causal = (k <= q)[None, None]
            if self.prefix_lengths is not None:
                causal = causal | (k[None, None] < self.prefix_lengths.to(device)[:, None, None, None])
            keep = keep & causal
        if self.window is not None:
            d = q - k
            keep = keep & ((d >= 0) & (d < self.window))[None, None]
        if self.chunk_size is not None:
            keep = keep & ((q // self.chunk_size) == (k // self.chunk_size))[None, None]
        if self.q_document_ids is not None:
            qd = self.q_document_ids.to(device)[:, None, :, None]
            kd = self.kv_document_ids.to(device)[:, None, None, :]
            keep = keep & (qd == kd)
        if self.key_padding is not None:
            keep = keep & self.key_padding.to(device=device, dtype=torch.bool)[:, None, None, :]
        return keep

"""The conjunction of two :class:`~learnmask.ops.structure.MaskStructure` values, when one exists.

``conjoin(a, b)`` returns a structure whose keep-mask is ``a.keep() & b.keep()`` for every size,
or None when the fields cannot express it (two different document partitions, chunk sizes neither
of which divides the other). Per-batch tensors broadcast over the batch (a batch of 1 is shared).
"""

from __future__ import annotations

import torch
from torch import Tensor

from learnmask.ops.structure import MaskStructure

__all__ = ["conjoin"]


def conjoin(a: MaskStructure, b: MaskStructure) -> MaskStructure | None:
    """Structure of ``a & b``, or None when a conjunction of the structure's fields cannot say it.

    Rules: causal conditions meet (a strict causal mask wins over a prefix-LM one; two prefix-LM
    masks keep the shorter prefix per batch row); windows take the smaller W; chunks take the
    smaller size when it divides the larger (finer chunks refine coarser ones); key paddings are
    and-ed; two different document partitions give None.
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

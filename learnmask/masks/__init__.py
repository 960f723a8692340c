"""Fixed masks: what a model may see (input tokens), where it may look (attention), what it may change.

* :mod:`~learnmask.masks.inputs` -- MLM masking (token, whole-word, span, entity), causal-LM
  labels, the masked-LM loss; :mod:`~learnmask.masks.collate` -- collate functions for a
  ``DataLoader`` or the Hugging Face ``Trainer``.
* :mod:`~learnmask.masks.attention` -- attention masks as ``mask_mod`` predicates (causal,
  padding, sliding window, prefix-LM, documents, chunks, user predicates) with ``&``, ``|``, ``~``,
  materialized as a boolean keep-mask, an additive bias (exactly ``finfo(dtype).min`` where masked)
  or a FlexAttention ``BlockMask``; the op that takes them is :func:`learnmask.ops.masked_attention`.
* :mod:`~learnmask.masks.structure` -- :class:`~learnmask.masks.structure.MaskStructure`, where the
  semantics of each structured predicate are written once, and its conjunction;
  :mod:`~learnmask.masks.structure_blocks` -- per-row key intervals and exact per-tile block states
  derived from it (what ``learnmask.ops`` plans its kernels with: ``ops`` imports ``masks``, never
  the reverse).
"""

from .attention import (
    AttentionMask,
    add_biases,
    bias_to_keep,
    causal,
    chunked,
    document,
    from_key_padding_mask,
    from_mod,
    full,
    keep_to_bias,
    padding,
    prefix_lm,
    sliding_window,
)
from .collate import CausalLMCollator, MLMCollator, tokenize_for_mlm
from .inputs import (
    IGNORE_INDEX,
    MaskingVocab,
    ReplacementSplit,
    apply_replacement,
    batch_word_ids,
    candidate_mask,
    causal_lm_labels,
    keyword_spans,
    mask_tokens,
    mlm_loss,
    select_char_spans,
    select_spans,
    select_tokens,
    select_whole_words,
    word_ids_from_offsets,
)

__all__ = [
    "AttentionMask",
    "add_biases",
    "bias_to_keep",
    "causal",
    "chunked",
    "document",
    "from_key_padding_mask",
    "from_mod",
    "full",
    "keep_to_bias",
    "padding",
    "prefix_lm",
    "sliding_window",
    "CausalLMCollator",
    "MLMCollator",
    "tokenize_for_mlm",
    "IGNORE_INDEX",
    "MaskingVocab",
    "ReplacementSplit",
    "apply_replacement",
    "batch_word_ids",
    "candidate_mask",
    "causal_lm_labels",
    "keyword_spans",
    "mask_tokens",
    "mlm_loss",
    "select_char_spans",
    "select_spans",
    "select_tokens",
    "select_whole_words",
    "word_ids_from_offsets",
]

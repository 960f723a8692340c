"""Input masking for masked and causal language modelling, correct for every tokenizer.

BERT-style masked language modelling (Devlin et al., 2019): select a fraction
``mlm_probability`` of the tokens, replace each selected token by ``[MASK]`` (80%), by a
random token (10%) or leave it (10%), and predict the original token at the selected positions
only (``labels`` is ``-100``, PyTorch's ``ignore_index``, elsewhere). Variants: whole-word
masking (all tokens of a word or none), SpanBERT spans (Joshi et al., 2020) and
entity/keyword masking (ERNIE, Sun et al., 2019); see :mod:`learnmask.masks.input_words`.

Two faults of widely used collators are excluded by construction (``shared/cases`` I1, I2):

* padding is read from ``attention_mask``, never from token ids, so a pad id equal to EOS
  cannot erase real EOS labels, and padding and special tokens are never selected;
* random replacements are drawn from the vocabulary *without* special ids.

Every function returns new tensors (inputs are never modified in place) and draws all its
randomness from the ``generator`` it is given, so a fixed generator state gives a fixed mask.

Legend: B batch, S sequence length (tokens), V vocabulary size, N selected positions.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from learnmask.masks.input_words import (
    batch_word_ids,
    check_batch,
    check_probability,
    check_same_shape,
    keyword_spans,
    select_char_spans,
    select_spans,
    word_ids_from_alignment,
    word_ids_from_offsets,
)

__all__ = [
    "IGNORE_INDEX",
    "ReplacementSplit",
    "MaskingVocab",
    "candidate_mask",
    "select_tokens",
    "select_whole_words",
    "select_spans",
    "select_char_spans",
    "keyword_spans",
    "batch_word_ids",
    "word_ids_from_alignment",
    "word_ids_from_offsets",
    "apply_replacement",
    "mask_tokens",
    "causal_lm_labels",
    "mlm_loss",
    "check_probability",
]

#: Label of positions that are not predicted (``ignore_index`` of ``F.cross_entropy``).
IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class ReplacementSplit:
    """What happens to a selected token: fractions replaced by the mask token, by a random
    token, or left unchanged; each in [0, 1], summing to 1 (BERT: 0.8 / 0.1 / 0.1).

    Raises:
        ValueError: a fraction outside [0, 1] or a sum other than 1 (within 1e-6).
    """

    mask: float = 0.8
    random: float = 0.1
    keep: float = 0.1

    def __post_init__(self) -> None:
        for name in ("mask", "random", "keep"):
            object.__setattr__(self, name, check_probability(getattr(self, name), f"ReplacementSplit.{name}"))
        total = self.mask + self.random + self.keep
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"ReplacementSplit fractions must sum to 1; got mask={self.mask} + random={self.random} "
                             f"+ keep={self.keep} = {total}")


@dataclasses.dataclass(frozen=True)
class MaskingVocab:
    """The few facts about a tokenizer that masking needs.

    Attributes:
        mask_token_id: id written at ``[MASK]`` replacements, in ``[0, vocab_size)``.
        vocab_size: number of ids V (``len(tokenizer)``, added tokens included).
        special_ids: ids never selected and never drawn as random replacements (pad, mask,
            cls, sep, bos, eos, unk and every other special token).

    Raises:
        ValueError: ``mask_token_id`` missing or outside ``[0, vocab_size)``; no id left for
            random replacement.
    """

    mask_token_id: int | None
    vocab_size: int
    special_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "special_ids", tuple(sorted({int(i) for i in self.special_ids})))
        if self.mask_token_id is None:
            raise ValueError("this tokenizer has no mask token (mask_token_id is None), and masked LM needs one: "
                             "add it with tokenizer.add_special_tokens({'mask_token': '[MASK]'}) and resize the "
                             "model's embeddings, or train a causal LM with causal_lm_labels()")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} is outside the vocabulary [0, {self.vocab_size})")
        if len({i for i in self.special_ids if 0 <= i < self.vocab_size}) >= self.vocab_size:
            raise ValueError("every id of the vocabulary is special; no id is left for random replacement")

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "MaskingVocab":
        """From a Hugging Face tokenizer: ``mask_token_id``, ``len(tokenizer)``, all special ids.

        Raises:
            ValueError: the tokenizer has no mask token (the message says how to add one).
        """
        special = set(getattr(tokenizer, "all_special_ids", []))
        for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
            if getattr(added, "special", False):
                special.add(int(token_id))
        if getattr(tokenizer, "mask_token_id", None) is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no mask token (mask_token_id is None), and "
                             "masked LM needs one: add it with tokenizer.add_special_tokens({'mask_token': '[MASK]'}) "
                             "and resize the model's embeddings, or train a causal LM with causal_lm_labels()")
        return cls(tokenizer.mask_token_id, len(tokenizer), tuple(special))

    def random_ids(self) -> Tensor:
        """``(V - #special,)`` int64: the ids random replacement draws from, uniformly."""
        allowed = torch.ones(self.vocab_size, dtype=torch.bool)
        allowed[[i for i in self.special_ids if 0 <= i < self.vocab_size]] = False
        return allowed.nonzero().squeeze(1)


def candidate_mask(
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    special_ids: Iterable[int] = (),
    special_tokens_mask: Tensor | None = None,
) -> Tensor:
    """``(B, S)`` bool: True where a token may be selected (a real, non-special token).

    Padding is where ``attention_mask == 0`` (never decided from the pad id). Special tokens
    are where the id is in ``special_ids`` or ``special_tokens_mask == 1`` (either one marks
    it: a literal "[CLS]" typed in the text is a special id the tokenizer's mask misses).

    Args:
        input_ids: ``(B, S)`` integer ids.
        attention_mask: ``(B, S)``, 1 = real token, 0 = padding; ``None`` = no padding.
        special_ids: ids of special tokens (``MaskingVocab.special_ids``).
        special_tokens_mask: ``(B, S)``, 1 = special token (``return_special_tokens_mask=True``).

    Raises:
        ValueError: a shape other than ``input_ids``'s.
    """
    check_batch(input_ids)
    real = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    if attention_mask is not None:
        check_same_shape(attention_mask, input_ids, "attention_mask")
        real = attention_mask.bool()
    ids = torch.tensor(sorted(set(special_ids)), dtype=input_ids.dtype, device=input_ids.device)
    special = torch.isin(input_ids, ids)
    if special_tokens_mask is not None:
        check_same_shape(special_tokens_mask, input_ids, "special_tokens_mask")
        special = special | special_tokens_mask.bool()
    return real & ~special


def select_tokens(candidates: Tensor, mlm_probability: float, *, generator: torch.Generator | None = None) -> Tensor:
    """``(B, S)`` bool: each candidate token selected independently with ``mlm_probability``.

    The selected fraction of candidates converges to ``mlm_probability`` (Devlin et al., 2019).
    """
    mlm_probability = check_probability(mlm_probability)
    draws = torch.rand(candidates.shape, generator=generator, device=candidates.device)
    return candidates & (draws < mlm_probability)


def select_whole_words(
    word_ids: Tensor, candidates: Tensor, mlm_probability: float, *, generator: torch.Generator | None = None
) -> Tensor:
    """Whole-word masking: each word selected with ``mlm_probability``, all its tokens or none.

    Every token belongs to one word, so the expected selected fraction of tokens is exactly
    ``mlm_probability``. Tokens with ``word_ids == -1`` are never selected.

    Args:
        word_ids: ``(B, S)`` int64 per-row word ids from :func:`batch_word_ids` (``-1`` = none).
        candidates: ``(B, S)`` bool.
        mlm_probability: in [0, 1].

    Raises:
        ValueError: shapes disagree or a probability outside [0, 1].
    """
    mlm_probability = check_probability(mlm_probability)
    check_same_shape(word_ids, candidates, "word_ids")
    words = int(word_ids.max().item()) + 1 if word_ids.numel() else 0
    chosen = torch.rand((word_ids.shape[0], max(words, 1)), generator=generator) < mlm_probability
    per_token = chosen.to(candidates.device).gather(1, word_ids.clamp(min=0).long())
    return candidates & (word_ids >= 0) & per_token


def apply_replacement(
    input_ids: Tensor,
    selected: Tensor,
    vocab: MaskingVocab,
    *,
    split: ReplacementSplit = ReplacementSplit(),
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Replace the selected tokens (mask / random / keep) and build the labels.

    Args:
        input_ids: ``(B, S)`` integer ids (left untouched).
        selected: ``(B, S)`` bool, the positions to predict.
        vocab: mask id, vocabulary size and special ids.
        split: fractions for ``[MASK]``, random token, unchanged.

    Returns:
        ``(masked_ids, labels)``, both ``(B, S)``: ``masked_ids`` of ``input_ids``'s dtype;
        ``labels`` int64, the original id where selected, ``-100`` elsewhere.
    """
    check_batch(input_ids)
    check_same_shape(selected, input_ids, "selected")
    selected = selected.bool()
    draws = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    to_mask = selected & (draws < split.mask)
    to_random = selected & (draws >= split.mask) & (draws < split.mask + split.random)
    pool = vocab.random_ids().to(input_ids.device)
    picks = pool[torch.randint(len(pool), input_ids.shape, generator=generator, device=input_ids.device)]
    masked = input_ids.clone()
    masked[to_mask] = vocab.mask_token_id
    masked[to_random] = picks[to_random].to(input_ids.dtype)
    labels = torch.full(input_ids.shape, IGNORE_INDEX, dtype=torch.long, device=input_ids.device)
    labels[selected] = input_ids[selected].long()
    return masked, labels


def mask_tokens(
    input_ids: Tensor,
    vocab: MaskingVocab,
    *,
    attention_mask: Tensor | None = None,
    mlm_probability: float = 0.15,
    split: ReplacementSplit = ReplacementSplit(),
    generator: torch.Generator | None = None,
    special_tokens_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT's token-level masking in one call (Devlin et al., 2019).

    Args:
        input_ids: ``(B, S)`` integer ids; ``B`` or ``S`` may be 0.
        vocab: :class:`MaskingVocab` (``MaskingVocab.from_tokenizer(tokenizer)``).
        attention_mask: ``(B, S)``, 1 = real token, 0 = padding (never selected).
        mlm_probability: fraction of real non-special tokens selected, in [0, 1]; 0 leaves
            the inputs unchanged with every label -100, 1 selects every real non-special token.
        split: :class:`ReplacementSplit`, default 0.8 / 0.1 / 0.1.
        generator: source of all randomness (selection, then replacement draws).
        special_tokens_mask: ``(B, S)``, 1 = special, on top of the ids in ``vocab.special_ids``.

    Returns:
        ``(masked_ids, labels)``, see :func:`apply_replacement`.

    Raises:
        ValueError: ``mlm_probability`` outside [0, 1], shapes that disagree.
    """
    mlm_probability = check_probability(mlm_probability)
    candidates = candidate_mask(input_ids, attention_mask, special_ids=vocab.special_ids,
                                special_tokens_mask=special_tokens_mask)
    selected = select_tokens(candidates, mlm_probability, generator=generator)
    return apply_replacement(input_ids, selected, vocab, split=split, generator=generator)


def causal_lm_labels(input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """``(B, S)`` int64 labels for causal LM: the ids themselves, ``-100`` at padding.

    Padding is read from ``attention_mask`` only, so with ``pad_token_id == eos_token_id``
    (GPT-2 and most decoder tokenizers) the real EOS tokens keep their labels. The shift by one
    position is left to the model (Hugging Face causal LMs shift internally).
    """
    check_batch(input_ids)
    labels = input_ids.clone().long()
    if attention_mask is not None:
        check_same_shape(attention_mask, input_ids, "attention_mask")
        labels[~attention_mask.bool()] = IGNORE_INDEX
    return labels


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over labelled positions; exactly 0.0 (not NaN) when there are none.

    Args:
        logits: ``(..., V)`` float scores.
        labels: ``(...)`` int64, ``-100`` where not predicted.

    Returns:
        0-dim tensor (differentiable in ``logits``).

    Raises:
        ValueError: ``logits.shape[:-1] != labels.shape``.
    """
    if tuple(logits.shape[:-1]) != tuple(labels.shape):
        raise ValueError(f"logits has shape {tuple(logits.shape)}; "
                         f"expected labels' shape {tuple(labels.shape)} + (vocab,)")
    flat_logits, flat_labels = rearrange(logits, "... v -> (...) v"), rearrange(labels, "... -> (...)")
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (flat_labels != IGNORE_INDEX).sum()
    return total / count.clamp(min=1)

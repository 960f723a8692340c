"""Collate functions for masked and causal LM: for a ``DataLoader`` or as a Hugging Face
``Trainer``'s ``data_collator``.

Examples are dicts of lists (what a tokenizer returns for one text). Keys read:
``input_ids`` (required), ``attention_mask``, ``token_type_ids``, ``special_tokens_mask``,
and, per strategy, ``word_ids`` (whole-word and span masking; ``None``/``-1`` for no word),
``offset_mapping`` with ``entity_spans`` (character spans) or ``text`` (for ``keywords``).
:func:`tokenize_for_mlm` makes such examples from raw text with any fast tokenizer.

With the Hugging Face ``Trainer``, set ``remove_unused_columns=False`` when the collator needs
``word_ids`` or offsets: the Trainer drops columns the model's ``forward`` does not take.

Legend: B batch, S longest sequence in the batch (rounded up to ``pad_to_multiple_of``).
"""
from __future__ import annotations

import math
from multiprocessing import context, sharedctypes
from typing import Any, Sequence

import torch
from torch import Tensor

from learnmask.masks.inputs import (
    MaskingVocab,
    ReplacementSplit,
    apply_replacement,
    candidate_mask,
    causal_lm_labels,
    check_probability,
    keyword_spans,
    select_char_spans,
    select_spans,
    select_tokens,
    select_whole_words,
    word_ids_from_alignment,
)

__all__ = ["STRATEGIES", "MLMCollator", "CausalLMCollator", "tokenize_for_mlm", "pad_examples"]

#: Selection strategies of :class:`MLMCollator`.
STRATEGIES = ("token", "whole_word", "span", "entity")

_PAD_VALUES = {"attention_mask": 0, "token_type_ids": 0, "special_tokens_mask": 1, "word_ids": -1}


def _as_list(value: Any) -> list:
    return value.tolist() if isinstance(value, Tensor) else list(value)


def pad_examples(examples: Sequence[dict], pad_token_id: int | None, *, side: str = "right",
                 pad_to_multiple_of: int | None = None) -> dict[str, Tensor]:
    """Pad per-example token lists into ``(B, S)`` int64 tensors (offsets into ``(B, S, 2)``).

    Keys padded: ``input_ids`` (with ``pad_token_id``), ``attention_mask`` (0; all ones when
    absent), ``token_type_ids`` (0), ``special_tokens_mask`` (1), ``word_ids`` (-1; ``None``
    entries become -1), ``offset_mapping`` ((0, 0)).

    Raises:
        ValueError: an example without ``input_ids``, lists of unequal length within an
            example, or rows of different lengths with no pad id.
    """
    if side not in ("right", "left"):
        raise ValueError(f"padding side must be 'right' or 'left'; got {side!r}")
    if isinstance(examples, (dict, str)) or hasattr(examples, "keys"):
        raise ValueError(f"examples must be a list of dicts (one per example); got {type(examples).__name__} "
                         "(a whole tokenizer output? pass [dict(zip(batch, row)) ...] or tokenize_for_mlm(...))")
    for number, example in enumerate(examples):
        if not hasattr(example, "keys"):
            raise ValueError(f"example {number} must be a dict with 'input_ids'; got {type(example).__name__}")
        if "input_ids" not in example:
            raise ValueError(f"example {number} has no 'input_ids'; keys: {sorted(example)}")
    lengths = [len(example["input_ids"]) for example in examples]
    length = max(lengths, default=0)
    if pad_to_multiple_of and length % pad_to_multiple_of:
        length = math.ceil(length / pad_to_multiple_of) * pad_to_multiple_of
    if pad_token_id is None and any(n != length for n in lengths):
        raise ValueError("rows of different lengths need padding, but the tokenizer has no pad token; "
                         "set tokenizer.pad_token (e.g. to the EOS token) or pass pad_token_id")
    keys = ["input_ids", "attention_mask"] + [k for k in ("token_type_ids", "special_tokens_mask", "word_ids",
                                                          "offset_mapping") if examples and k in examples[0]]
    out = {}
    for key in keys:
        fill = pad_token_id if key == "input_ids" else _PAD_VALUES.get(key, (0, 0))
        rows = []
        for number, (example, n) in enumerate(zip(examples, lengths)):
            values = _as_list(example[key]) if key in example else [1] * n
            if len(values) != n:
                raise ValueError(f"example {number}: {key} has {len(values)} entries; expected {n} like input_ids")
            values = [_PAD_VALUES["word_ids"] if v is None else v for v in values]
            padding = [fill if fill is not None else 0] * (length - n)
            rows.append(values + padding if side == "right" else padding + values)
        trailing = (2,) if key == "offset_mapping" else ()
        out[key] = torch.tensor(rows, dtype=torch.long).reshape(len(examples), length, *trailing)
    return out


def tokenize_for_mlm(tokenizer, texts: Sequence[str], *, max_length: int | None = None,
                     offsets: bool = False) -> list[dict[str, list]]:
    """Tokenize texts into collator examples with per-example word ids, from any fast tokenizer.

    Returns:
        one dict per text (``[]`` for no text): ``input_ids``, ``attention_mask``, ``special_tokens_mask`` (and
        ``token_type_ids`` when the tokenizer makes them),
        ``word_ids`` (``-1`` = no word; from ``word_ids()``, never from token strings), and
        with ``offsets=True`` also ``offset_mapping`` and ``text``.

    Raises:
        ValueError: a slow tokenizer (no word alignment).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer, so it has no word alignment; "
                         "load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
    if not texts:
        return []
    encoding = tokenizer(list(texts), truncation=max_length is not None, max_length=max_length,
                         return_special_tokens_mask=True, return_offsets_mapping=offsets)
    examples = []
    for i, text in enumerate(texts):
        example = {key: list(encoding[key][i]) for key in ("input_ids", "attention_mask", "token_type_ids",
                                                          "special_tokens_mask") if key in encoding}
        example["word_ids"] = word_ids_from_alignment(encoding.word_ids(i), encoding.sequence_ids(i))
        if offsets:
            example["offset_mapping"] = [tuple(pair) for pair in encoding["offset_mapping"][i]]
            example["text"] = text
        examples.append(example)
    return examples


class _Seeded:
    """A generator seeded from ``seed`` and, inside a DataLoader worker, the worker id.

    DataLoader workers each get a copy of the collator; without the worker id every worker
    would draw the same masks.
    """

    def __init__(self, seed: int | None, generator: torch.Generator | None):
        if seed is not None and generator is not None:
            raise ValueError("pass seed or generator, not both")
        self.seed, self.generator, self._worker = seed, generator, None

    def get(self) -> torch.Generator | None:
        if self.seed is None:
            return self.generator
        info = torch.utils.data.get_worker_info()
        worker = None if info is None else info.id
        if self.generator is None or worker != self._worker:
            offset = 0 if worker is None else 1_000_003 * (worker + 1)
            self.generator, self._worker = torch.Generator().manual_seed(self.seed + offset), worker
        return self.generator


class _SharedCount:
    """A count of collated batches shared by a collator and the copies DataLoader workers hold.

    Shared memory (``multiprocessing.sharedctypes.RawArray``) that forked workers inherit and
    spawned ones receive with the collator. Each process adds to its own slot (the process that
    made it: slot 0; worker ``i``: slot ``1 + i``), so no count is lost without a lock; the
    count is the sum. A copy made any other way (``copy.deepcopy``, ``pickle``) counts on its own
    from the current value.
    """

    SLOTS = 129  # the creating process + 128 workers (more share slots, and may lose counts)

    def __init__(self, value: int = 0) -> None:
        self._slots = sharedctypes.RawArray("q", self.SLOTS)
        self._slots[0] = value

    @property
    def value(self) -> int:
        return sum(self._slots)

    @value.setter
    def value(self, value: int) -> None:
        for slot in range(self.SLOTS):
            self._slots[slot] = 0
        self._slots[0] = value

    def take(self) -> int:
        """The count before this batch; counts it."""
        info = torch.utils.data.get_worker_info()
        count = sum(self._slots)
        self._slots[0 if info is None else 1 + info.id % (self.SLOTS - 1)] += 1
        return count

    def __reduce__(self):
        if context.get_spawning_popen() is not None:  # a worker process starting: share the memory
            return _shared_count, (self._slots,)
        return _SharedCount, (self.value,)


def _shared_count(slots) -> _SharedCount:
    count = _SharedCount.__new__(_SharedCount)
    count._slots = slots
    return count


class MLMCollator:
    """Pad a list of examples and mask them for MLM: ``{input_ids, attention_mask, labels}``.

    Args:
        tokenizer: a Hugging Face tokenizer (mask id, vocabulary, special ids, pad id and
            padding side); or ``None`` with ``vocab`` and ``pad_token_id``. A ``pad_token_id``
            given explicitly takes priority over the tokenizer's.
        mlm_probability: fraction of real non-special tokens selected, in [0, 1]; may be
            changed between batches (a schedule or controller), validated on every set.
        strategy: ``token`` (Devlin et al., 2019), ``whole_word`` (by ``word_ids``),
            ``span`` (SpanBERT, Joshi et al., 2020: ``geometric_p``, ``max_span`` words) or
            ``entity`` (each character span in ``entity_spans``, or each occurrence of
            ``keywords``, masked whole with ``entity_probability``; Sun et al., 2019).
        split: replacement fractions, default 0.8 / 0.1 / 0.1.
        seed: seeds a private generator (per DataLoader worker); or give ``generator``.
        pad_to_multiple_of: round S up to a multiple of this.
        rate_schedule: optional ``schedule(step) -> rate`` (e.g. ``LinearDecay(0.3, 0.15, n)``,
            Ankner et al., 2023): each call sets ``mlm_probability`` from its own count of
            batches, ``schedule(batches_collated // batches_per_step)``. Counting in the
            collator keeps the rate exact when a loader collates batches ahead of the step.
            In a ``DataLoader`` with ``num_workers > 0`` the count is shared by all workers and
            epochs (shared memory), so the schedule advances once per batch as without workers;
            which of the batches collated at the same moment (at most ``num_workers *
            prefetch_factor``) takes which count then depends on timing (``num_workers=0`` is
            exactly reproducible). ``mlm_probability`` set in the training process reaches
            workers started after it only.
        batches_per_step: batches per optimizer step (gradient accumulation), >= 1.

    Raises:
        ValueError: unknown strategy, a probability outside [0, 1], a tokenizer without a
            mask token, an example missing what the strategy needs.
    """

    def __init__(self, tokenizer=None, *, vocab: MaskingVocab | None = None, pad_token_id: int | None = None,
                 mlm_probability: float = 0.15, strategy: str = "token", split: ReplacementSplit = ReplacementSplit(),  # noqa: B008 (frozen, never mutated)
                 seed: int | None = None, generator: torch.Generator | None = None,
                 pad_to_multiple_of: int | None = None, geometric_p: float = 0.2, max_span: int = 10,
                 entity_probability: float = 1.0, keywords: Sequence[str] = (), rate_schedule=None,
                 batches_per_step: int = 1):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; expected one of {list(STRATEGIES)}")
        if tokenizer is None and vocab is None:
            raise ValueError("MLMCollator needs a tokenizer, or vocab=MaskingVocab(...) and pad_token_id")
        self.vocab = vocab or MaskingVocab.from_tokenizer(tokenizer)
        self.pad_token_id = pad_token_id if pad_token_id is not None or tokenizer is None else tokenizer.pad_token_id
        self.padding_side = getattr(tokenizer, "padding_side", "right")
        self.mlm_probability = mlm_probability
        self.strategy, self.split, self.pad_to_multiple_of = strategy, split, pad_to_multiple_of
        self.geometric_p, self.max_span = geometric_p, max_span
        self.entity_probability = check_probability(entity_probability, "entity_probability")
        self.keywords = tuple(keywords)
        self._random = _Seeded(seed, generator)
        if not isinstance(batches_per_step, int) or batches_per_step < 1:
            raise ValueError(f"batches_per_step must be an int >= 1; got {batches_per_step!r}")
        self.rate_schedule, self.batches_per_step = rate_schedule, batches_per_step
        self._count = _SharedCount()

    @property
    def batches_collated(self) -> int:
        """Batches collated so far, by this collator and every DataLoader worker copy of it."""
        return self._count.value

    @batches_collated.setter
    def batches_collated(self, value: int) -> None:
        self._count.value = value

    @property
    def mlm_probability(self) -> float:
        """The current masking rate, in [0, 1]."""
        return self._mlm_probability

    @mlm_probability.setter
    def mlm_probability(self, value: float) -> None:
        self._mlm_probability = check_probability(value)

    def __call__(self, examples: Sequence[dict]) -> dict[str, Tensor]:
        """Examples → ``input_ids`` ``(B, S)`` masked, ``attention_mask``, ``labels`` (-100 =
        not predicted), and ``token_type_ids`` when the examples have them."""
        collated = self._count.take()
        if self.rate_schedule is not None:
            self.mlm_probability = self.rate_schedule(collated // self.batches_per_step)
        batch = pad_examples(examples, self.pad_token_id, side=self.padding_side,
                             pad_to_multiple_of=self.pad_to_multiple_of)
        generator = self._random.get()
        candidates = candidate_mask(batch["input_ids"], batch["attention_mask"], special_ids=self.vocab.special_ids,
                                    special_tokens_mask=batch.get("special_tokens_mask"))
        selected = self._select(batch, examples, candidates, generator)
        masked, labels = apply_replacement(batch["input_ids"], selected, self.vocab, split=self.split,
                                           generator=generator)
        out = {"input_ids": masked, "attention_mask": batch["attention_mask"], "labels": labels}
        if "token_type_ids" in batch:
            out["token_type_ids"] = batch["token_type_ids"]
        return out

    def _need(self, batch: dict, key: str) -> Tensor:
        if key not in batch:
            raise ValueError(f"strategy {self.strategy!r} needs {key!r} in every example (see tokenize_for_mlm); "
                             "with the Hugging Face Trainer set remove_unused_columns=False so the column reaches "
                             "the collator")
        return batch[key]

    def _select(self, batch: dict, examples: Sequence[dict], candidates: Tensor, generator) -> Tensor:
        p = self.mlm_probability
        if self.strategy == "token":
            return select_tokens(candidates, p, generator=generator)
        if self.strategy == "whole_word":
            return select_whole_words(self._need(batch, "word_ids"), candidates, p, generator=generator)
        if self.strategy == "span":
            return select_spans(self._need(batch, "word_ids"), candidates, p, generator=generator,
                                geometric_p=self.geometric_p, max_span=self.max_span)
        offsets = self._need(batch, "offset_mapping")
        if self.keywords:
            spans = [keyword_spans(example["text"], self.keywords) if "text" in example else [] for example in examples]
        else:
            spans = [list(example.get("entity_spans", [])) for example in examples]
        if self.padding_side == "left":
            raise ValueError("entity masking reads character offsets and needs right padding (tokenizer.padding_side)")
        return select_char_spans(offsets, spans, candidates, probability=self.entity_probability, generator=generator)


class CausalLMCollator:
    """Pad examples for causal LM: ``{input_ids, attention_mask, labels}``, labels ``-100``
    only where ``attention_mask`` is 0 (so EOS keeps its label when ``pad == eos``).

    Args:
        tokenizer: gives ``pad_token_id`` and the padding side; or ``None`` with ``pad_token_id``.

    Raises:
        ValueError: rows of different lengths and no pad id.
    """

    def __init__(self, tokenizer=None, *, pad_token_id: int | None = None, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id if pad_token_id is not None or tokenizer is None else tokenizer.pad_token_id
        self.padding_side = getattr(tokenizer, "padding_side", "right")
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[dict]) -> dict[str, Tensor]:
        """Examples → padded ``input_ids``, ``attention_mask`` and ``labels``, all ``(B, S)``."""
        batch = pad_examples(examples, self.pad_token_id, side=self.padding_side,
                             pad_to_multiple_of=self.pad_to_multiple_of)
        labels = causal_lm_labels(batch["input_ids"], batch["attention_mask"])
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}

"""Token chunks of Shakespeare for continued MLM, the fixed held-out set, and batch masking.

Each play is tokenized once (no truncation) and cut into chunks of ``max_length`` tokens:
``[CLS]`` + ``max_length - 2`` tokens + ``[SEP]``; the last partial chunk of a play is dropped,
so no chunk has padding. Per-chunk word ids (for whole-word and span masking) come from the
fast tokenizer's own alignment.

Legend: N chunks, L = ``max_length`` tokens per chunk.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
from torch import Tensor

from learnmask.lm_data import load_shakespeare, split_plays
from learnmask.masks.inputs import (
    MaskingVocab,
    apply_replacement,
    candidate_mask,
    select_spans,
    select_tokens,
    select_whole_words,
    word_ids_from_alignment,
)


@dataclasses.dataclass(frozen=True)
class Chunks:
    """Equal-length token chunks: ``input_ids`` and ``word_ids``, both ``(N, L)`` int64 (-1 = no word)."""

    input_ids: Tensor
    word_ids: Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def chunk_play(tokenizer, text: str, max_length: int) -> Chunks:
    """Cut one text into ``[CLS] ... [SEP]`` chunks of exactly ``max_length`` tokens.

    Raises:
        ValueError: the tokenizer has no CLS/SEP token or is not fast (no word alignment).
    """
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None or not tokenizer.is_fast:
        raise ValueError(f"{type(tokenizer).__name__} needs CLS and SEP tokens "
                         "and a fast implementation for MLM chunks")
    encoding = tokenizer(text, add_special_tokens=False)
    ids, words = encoding["input_ids"], encoding.word_ids()
    body = max_length - 2
    rows_ids, rows_words = [], []
    for start in range(0, len(ids) - body + 1, body):
        rows_ids.append([tokenizer.cls_token_id, *ids[start : start + body], tokenizer.sep_token_id])
        rows_words.append(word_ids_from_alignment([None, *words[start : start + body], None]))
    shape = (len(rows_ids), max_length)
    return Chunks(torch.tensor(rows_ids, dtype=torch.long).reshape(shape),
                  torch.tensor(rows_words, dtype=torch.long).reshape(shape))


def _concat(parts: list[Chunks], max_length: int) -> Chunks:
    if not parts:
        return Chunks(torch.zeros(0, max_length, dtype=torch.long), torch.zeros(0, max_length, dtype=torch.long))
    return Chunks(torch.cat([p.input_ids for p in parts]), torch.cat([p.word_ids for p in parts]))


@functools.lru_cache(maxsize=2)
def shakespeare_chunks(tokenizer_folder: str, max_length: int, heldout_plays: int) -> tuple[Chunks, Chunks]:
    """Training chunks and held-out chunks (from held-out plays), cached per process.

    Args:
        tokenizer_folder: a local model folder with a fast tokenizer (loaded offline).

    Returns:
        ``(train, heldout)`` :class:`Chunks`; on MiniLM's tokenizer with ``max_length=128``
        about 9,000 and 800 chunks.
    """
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_folder)
    transformers.logging.set_verbosity_error()  # plays are longer than the model's 512 positions; chunks are not
    split = split_plays(load_shakespeare(), heldout_plays=heldout_plays, seed=0)
    train = _concat([chunk_play(tokenizer, play.text, max_length) for play in split.train], max_length)
    heldout = _concat([chunk_play(tokenizer, play.text, max_length) for play in split.heldout], max_length)
    return train, heldout


def select(strategy: str, chunks: Chunks, vocab: MaskingVocab, rate: float, generator: torch.Generator) -> Tensor:
    """``(N, L)`` bool positions to predict in ``chunks`` at masking ``rate``, by ``strategy``."""
    candidates = candidate_mask(chunks.input_ids, None, special_ids=vocab.special_ids)
    if strategy == "whole_word":
        return select_whole_words(chunks.word_ids, candidates, rate, generator=generator)
    if strategy == "span":
        return select_spans(chunks.word_ids, candidates, rate, generator=generator)
    return select_tokens(candidates, rate, generator=generator)


def mask_chunks(
    strategy: str, chunks: Chunks, vocab: MaskingVocab, rate: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``(masked_ids, labels)``, both ``(N, L)``: 80/10/10 replacement at ``rate`` (see ``learnmask.masks.inputs``)."""
    selected = select(strategy, chunks, vocab, rate, generator)
    return apply_replacement(chunks.input_ids, selected, vocab, generator=generator)


def heldout_batch(heldout: Chunks, vocab: MaskingVocab, *, count: int, rate: float, seed: int) -> tuple[Tensor, Tensor]:
    """The fixed evaluation set: ``count`` held-out chunks (a seeded choice) masked once, token-level.

    The same ``seed`` gives the same chunks, positions and replacements, whatever the run,
    so every row of a grid is scored on exactly the same masked tokens.

    Raises:
        ValueError: ``count`` larger than the held-out chunks.
    """
    if count > len(heldout):
        raise ValueError(f"eval_chunks is {count}, but the held-out plays give only {len(heldout)} chunks")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(heldout), generator=generator)[:count].sort().values
    subset = Chunks(heldout.input_ids[chosen], heldout.word_ids[chosen])
    return mask_chunks("token", subset, vocab, rate, generator)


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A generator that depends only on ``(seed, step, stream)``: masks at a step are the same
    after a resume, whatever ran before."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 7 + stream) % (2**63))


def batch_indices(num_chunks: int, batch_size: int, step: int, seed: int, stream: int = 0) -> Tensor:
    """``(batch_size,)`` chunk indices of ``step``: epochs of seeded permutations (last partial batch dropped).

    Raises:
        ValueError: fewer chunks than ``batch_size``.
    """
    per_epoch = num_chunks // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the {num_chunks} training chunks")
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(num_chunks, generator=step_generator(seed, epoch, stream=10 + stream))
    return order[index * batch_size : (index + 1) * batch_size]

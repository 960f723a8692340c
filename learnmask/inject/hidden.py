"""Where the hidden (residual-stream) dimensions live outside the transformer layers.

Gating hidden dimensions (CoFi, Xia, Zhong & Chen 2022) touches every tensor with a d-wide
side: embeddings, every norm on the residual stream, and the maps that read the final hidden
states (pooler, classifier, language-model head). Inside layers the :class:`LayerSpec` says where
they are; this file lists the rest for each supported model family and task head.

A masked-LM head (``dense -> act -> LayerNorm -> decoder``) whose decoder is tied to the word
embeddings works in the stream's own coordinates: its ``dense`` reads d and writes d, its
LayerNorm is one more stream norm (normalise over the kept dims, times z), and the decoder reads
d. Removing the closed dims from all three is exact.

Legend: ``d`` hidden size, ``k`` hidden dims kept.
"""
from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from learnmask.inject.architectures import LayerSpec

# Per family: paths (relative to the base model) of embedding modules/parameters whose last
# dimension is d, of norms on the stream outside layers, and of maps reading the final stream.
_FAMILIES = {
    "bert": dict(marker="embeddings.word_embeddings", norms=["embeddings.LayerNorm"], readers=["pooler.dense"],
                 embeddings=["embeddings.word_embeddings", "embeddings.position_embeddings",
                             "embeddings.token_type_embeddings"]),
    "distilbert": dict(marker="embeddings.word_embeddings", norms=["embeddings.LayerNorm"], readers=[],
                       embeddings=["embeddings.word_embeddings", "embeddings.position_embeddings"]),
    "gpt2": dict(marker="wte", norms=["ln_f"], readers=[], embeddings=["wte", "wpe"]),
    "vit": dict(marker="embeddings.patch_embeddings", norms=["layernorm"], readers=["pooler.dense"],
                embeddings=["embeddings.patch_embeddings.projection", "embeddings.cls_token",
                            "embeddings.position_embeddings", "embeddings.mask_token"]),
    "llama": dict(marker="embed_tokens", norms=["norm"], readers=[], embeddings=["embed_tokens"]),
}


@dataclasses.dataclass(frozen=True)
class _Head:
    """A task head, paths relative to the whole model.

    readers: linear maps whose input is d-wide in stream coordinates (input columns sliced).
    writers: linear maps whose output is d-wide in stream coordinates (output rows and bias
        sliced); a map in both lists is sliced both ways (k x k weight).
    norms: norms on such a d-wide output, treated like the residual-stream norms.
    """

    readers: tuple[str, ...] = ()
    writers: tuple[str, ...] = ()
    norms: tuple[str, ...] = ()


def _reads(*paths: str) -> _Head:
    return _Head(readers=paths)


def _lm_head(dense: str, norm: str, decoder: str) -> _Head:
    """``decoder(norm(act(dense(x))))``, the decoder usually tied to the word embeddings (untied
    works too: gating ``norm`` puts its output in the stream's coordinates either way)."""
    return _Head(readers=(dense, decoder), writers=(dense,), norms=(norm,))


_BERT_LM = _lm_head("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
                    "cls.predictions.decoder")
_ROBERTA_LM = _lm_head("lm_head.dense", "lm_head.layer_norm", "lm_head.decoder")

# Task heads, checked against transformers 5.x sources. A head not listed here is refused rather
# than guessed (a classifier may read the pooler, or a head may work in its own coordinates).
# Heads reading only the pooler output (BERT/RoBERTa sequence classification, multiple choice,
# next-sentence prediction) need nothing: the pooler's dense reads d, its output is not the stream.
_HEADS = {
    "BertModel": _Head(), "BertForSequenceClassification": _Head(), "BertForMultipleChoice": _Head(),
    "BertForNextSentencePrediction": _Head(), "BertForTokenClassification": _reads("classifier"),
    "BertForQuestionAnswering": _reads("qa_outputs"), "BertForMaskedLM": _BERT_LM, "BertLMHeadModel": _BERT_LM,
    "BertForPreTraining": _BERT_LM,  # + seq_relationship, which reads the pooler output
    "RobertaModel": _Head(), "RobertaForSequenceClassification": _reads("classifier.dense"),
    "RobertaForMultipleChoice": _Head(), "RobertaForTokenClassification": _reads("classifier"),
    "RobertaForQuestionAnswering": _reads("qa_outputs"), "RobertaForMaskedLM": _ROBERTA_LM,
    "RobertaForCausalLM": _ROBERTA_LM,
    "DistilBertModel": _Head(), "DistilBertForSequenceClassification": _reads("pre_classifier"),
    "DistilBertForMultipleChoice": _reads("pre_classifier"), "DistilBertForTokenClassification": _reads("classifier"),
    "DistilBertForQuestionAnswering": _reads("qa_outputs"),
    "DistilBertForMaskedLM": _lm_head("vocab_transform", "vocab_layer_norm", "vocab_projector"),
    "GPT2Model": _Head(), "GPT2LMHeadModel": _reads("lm_head"), "GPT2ForSequenceClassification": _reads("score"),
    "GPT2ForTokenClassification": _reads("classifier"), "GPT2ForQuestionAnswering": _reads("qa_outputs"),
    "ViTModel": _Head(), "ViTForImageClassification": _reads("classifier"),
    "LlamaModel": _Head(), "LlamaForCausalLM": _reads("lm_head"), "LlamaForSequenceClassification": _reads("score"),
    "LlamaForTokenClassification": _reads("score"), "LlamaForQuestionAnswering": _reads("qa_outputs"),
}


@dataclasses.dataclass(frozen=True)
class StreamCost:
    """Parameters outside layers as a function of the hidden dims kept: ``b * k + c * k²``.

    ``b``: parameters per kept dim (embedding columns, norm entries, reader input columns,
    writer output rows and biases); ``c``: per kept dim squared (a map that reads and writes d,
    as a masked-LM head's ``dense``). Tied tensors count once.
    """

    b: float = 0.0
    c: float = 0.0

    def at(self, k: float | Tensor) -> float | Tensor:
        """Parameters at ``k`` kept dims (float or 0-dim tensor).

        Given the expected count ``k = E[kept] = Σ_j p_j`` of keep probabilities ``p`` ``(d,)``,
        ``c k²`` falls short of the expected ``c E[kept²]`` by ``c Σ_j p_j (1 - p_j)`` (the
        variance, independent gates); exact when every p is 0 or 1 (``remaining_parameters``)."""
        return self.b * k + self.c * k * k


@dataclasses.dataclass
class HiddenStream:
    """The d-wide tensors of a model outside its layers, plus every residual-stream norm.

    Attributes:
        norms: every norm on the residual stream (in layers and outside) and on a head's
            d-wide output, in model order.
        outside_norms: the norms outside layers (embedding, final and head norms).
        embeddings: ``(owner, attribute)`` of each embedding tensor holder whose last dim
            (``nn.Embedding`` columns, a raw parameter's last dim, a ``Conv2d``'s output
            channels) is d.
        readers: linear maps outside layers whose input is d-wide in stream coordinates.
        writers: linear maps outside layers whose output is d-wide in stream coordinates.
        cost: parameters outside layers as a function of the hidden dims kept.
    """

    norms: list[nn.Module]
    outside_norms: list[nn.Module]
    embeddings: list[tuple[nn.Module, str]]
    readers: list[nn.Module]
    writers: list[nn.Module]
    cost: StreamCost


def _resolve(root: nn.Module, path: str):
    owner_path, _, attr = path.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    return owner, attr, getattr(owner, attr, None)


def find_hidden_stream(model: nn.Module, layers: list[LayerSpec]) -> HiddenStream:
    """The :class:`HiddenStream` of ``model``.

    Raises:
        ValueError: layers of an architecture without hidden support (nn.MultiheadAttention
            fixes its width), or a task head not in the supported list (the message names them).
    """
    arch = layers[0].arch
    if arch not in _FAMILIES:
        raise ValueError(f"hidden-dimension gating is not supported for {arch} layers (supported: "
                         f"{', '.join(_FAMILIES)}); gate heads, ffn or blocks instead")
    kind = type(model).__name__
    if kind not in _HEADS:
        raise ValueError(f"hidden-dimension gating does not know the task head of {kind}; supported models: "
                         f"{', '.join(_HEADS)}")
    family, head = _FAMILIES[arch], _HEADS[kind]
    base = next((m for m in model.modules() if _has_path(m, family["marker"])), None)
    if base is None:
        raise ValueError(f"cannot find the embeddings ({family['marker']}) of {kind}")
    stream_norms = [_resolve(base, p)[2] for p in family["norms"]]
    head_norms = [_head_module(model, p) for p in head.norms]
    embeddings = []
    for path in family["embeddings"]:
        owner, attr, value = _resolve(base, path)
        if value is not None:
            embeddings.append((owner, attr))
    readers = [_resolve(base, p)[2] for p in family["readers"] if _has_path(base, p)]
    readers += [_head_module(model, p) for p in head.readers]
    writers = [_head_module(model, p) for p in head.writers]
    cost = _stream_cost(embeddings, readers, writers, stream_norms + head_norms, layers[0].hidden_size)
    inside = [n for layer in layers for n in layer.norms]
    first = [n for n, path in zip(stream_norms, family["norms"]) if path.startswith("embeddings")]
    last = [n for n in stream_norms if n not in first]
    return HiddenStream(first + inside + last + head_norms, stream_norms + head_norms, embeddings, readers,
                        writers, cost)


def _head_module(model: nn.Module, path: str) -> nn.Module:
    """The head's module at ``path``; ValueError if this version of the class has none there."""
    if not _has_path(model, path):
        raise ValueError(f"{type(model).__name__} has no {path!r}, where learnmask expects part of its task head "
                         "(a different transformers version?); hidden-dimension gating cannot place it")
    return model.get_submodule(path)


def _stream_cost(embeddings: list[tuple[nn.Module, str]], readers: list[nn.Module], writers: list[nn.Module],
                 norms: list[nn.Module], d: int) -> StreamCost:
    """Every d-wide tensor outside layers once (tied ones by identity), by how many of its axes
    are sliced: one (``numel / d`` per kept dim) or two (``numel / d²`` per kept dim squared)."""
    axes: dict[int, tuple[Tensor, set[int]]] = {}  # id -> (tensor, its sliced axes)

    def add(tensor: Tensor, axis: int) -> None:
        axes.setdefault(id(tensor), (tensor, set()))[1].add(axis % tensor.dim())

    for owner, attr in embeddings:
        value = getattr(owner, attr)
        if isinstance(value, nn.Conv2d):  # ViT patch projection: d output channels
            for tensor in value.parameters():
                add(tensor, 0)
        elif isinstance(value, nn.Embedding):
            add(value.weight, 1)
        else:  # a raw parameter whose last dim is d
            add(value, -1)
    for module in readers:  # a decoder tied to an embedding adds the same axis, so counts once
        add(module.weight, 0 if _conv1d(module) else 1)
    for module in writers:
        add(module.weight, 1 if _conv1d(module) else 0)
        if module.bias is not None:
            add(module.bias, 0)
    for norm in norms:
        for tensor in norm.parameters():
            add(tensor, 0)
    b = sum(t.numel() / d for t, sliced in axes.values() if len(sliced) == 1)
    c = sum(t.numel() / d ** 2 for t, sliced in axes.values() if len(sliced) == 2)
    return StreamCost(b=b, c=c)


def _conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D`` stores its weight as ``(in, out)``, the transpose of ``nn.Linear``."""
    return type(module).__name__ == "Conv1D"


def _has_path(module: nn.Module, path: str) -> bool:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return False
    return True

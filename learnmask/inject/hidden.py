"""Where the hidden (residual-stream) dimensions live outside the transformer layers.

Gating hidden dimensions (CoFi, Xia, Zhong & Chen 2022) touches every tensor with a d-wide
side: embeddings, every norm on the residual stream, and the maps that read the final hidden
states (pooler, classifier, language-model head). Inside layers the :class:`LayerSpec` says where
they are; this file lists the rest for each supported model family and head.

Legend: ``d`` hidden size.
"""
from __future__ import annotations

import dataclasses

from torch import nn

from learnmask.inject.architectures import LayerSpec
from learnmask.inject.costs import Cost

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

# Task heads: maps (relative to the whole model) that read the final hidden stream. A head not
# listed here is refused rather than guessed (a classifier may read the pooler instead).
_HEADS = {
    "BertModel": [], "BertForSequenceClassification": [], "BertForTokenClassification": ["classifier"],
    "RobertaModel": [], "RobertaForSequenceClassification": ["classifier.dense"],
    "DistilBertModel": [], "DistilBertForSequenceClassification": ["pre_classifier"],
    "GPT2Model": [], "GPT2LMHeadModel": ["lm_head"],
    "ViTModel": [], "ViTForImageClassification": ["classifier"],
    "LlamaModel": [], "LlamaForCausalLM": ["lm_head"],
}


@dataclasses.dataclass
class HiddenStream:
    """The d-wide tensors of a model outside its layers, plus every residual-stream norm.

    Attributes:
        norms: every norm on the residual stream (in layers and outside), in model order.
        outside_norms: the norms outside layers (embedding and final norms).
        embeddings: ``(owner, attribute)`` of each embedding tensor holder whose last dim
            (``nn.Embedding`` columns, a raw parameter's last dim, a ``Conv2d``'s output
            channels) is d.
        readers: linear maps outside layers whose input is the final hidden stream.
        cost: parameters outside layers per hidden dimension (``Cost.b``; tied weights once).
    """

    norms: list[nn.Module]
    outside_norms: list[nn.Module]
    embeddings: list[tuple[nn.Module, str]]
    readers: list[nn.Module]
    cost: Cost


def _resolve(root: nn.Module, path: str):
    owner_path, _, attr = path.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    return owner, attr, getattr(owner, attr, None)


def find_hidden_stream(model: nn.Module, layers: list[LayerSpec]) -> HiddenStream:
    """The :class:`HiddenStream` of ``model``.

    Raises:
        ValueError: layers of an architecture without hidden support (nn.MultiheadAttention
            fixes its width), or a task head not in the supported list.
    """
    arch = layers[0].arch
    if arch not in _FAMILIES:
        raise ValueError(f"hidden-dimension gating is not supported for {arch} layers (supported: "
                         f"{', '.join(_FAMILIES)}); gate heads, ffn or blocks instead")
    kind = type(model).__name__
    if kind not in _HEADS:
        raise ValueError(f"hidden-dimension gating does not know the task head of {kind}; supported models: "
                         f"{', '.join(_HEADS)}")
    family = _FAMILIES[arch]
    base = next((m for m in model.modules() if _has_path(m, family["marker"])), None)
    if base is None:
        raise ValueError(f"cannot find the embeddings ({family['marker']}) of {kind}")
    outside_norms = [_resolve(base, p)[2] for p in family["norms"]]
    embeddings = []
    for path in family["embeddings"]:
        owner, attr, value = _resolve(base, path)
        if value is not None:
            embeddings.append((owner, attr))
    readers = [_resolve(base, p)[2] for p in family["readers"] if _has_path(base, p)]
    readers += [_resolve(model, p)[2] for p in _HEADS[kind]]
    d = layers[0].hidden_size
    tensors = {}  # every d-wide tensor outside layers, tied ones once: numel / d per hidden dim
    for owner, attr in embeddings:
        value = getattr(owner, attr)
        for tensor in value.parameters() if isinstance(value, nn.Module) else [value]:
            tensors[id(tensor)] = tensor
    for module in readers:
        tensors[id(module.weight)] = module.weight
    for norm in outside_norms:
        tensors.update((id(t), t) for t in norm.parameters())
    per_dim = sum(t.numel() for t in tensors.values()) / d
    inside = [n for layer in layers for n in layer.norms]
    first = [n for n, path in zip(outside_norms, family["norms"]) if path.startswith("embeddings")]
    last = [n for n in outside_norms if n not in first]
    return HiddenStream(first + inside + last, outside_norms, embeddings, readers, Cost(b=per_dim))


def _has_path(module: nn.Module, path: str) -> bool:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return False
    return True

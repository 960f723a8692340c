"""Tiny randomly initialised models of every architecture learnmask gates, with an input each.

Every model has 2 layers, 4 heads (Llama: 4 query heads in 2 key/value groups), hidden 32 and
FFN 64 (GPT-2: 128), no dropout, and is in eval mode. ``run(name, model, inputs)`` returns the
tensor to compare (logits or last hidden state).
"""
from __future__ import annotations

import torch
from torch import nn

ARCHS = ["bert", "roberta", "distilbert", "gpt2", "vit", "llama", "encoder_layer", "multihead_attention"]
LAYERS, HEADS, HIDDEN = 2, 4, 32


class MHAStack(nn.Module):
    """Two bare nn.MultiheadAttention blocks with residuals (no FFN)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.MultiheadAttention(HIDDEN, HEADS, batch_first=True) for _ in range(LAYERS))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x, x, x, need_weights=False)[0]
        return x


def make(name: str, seed: int = 0) -> nn.Module:
    """A tiny model of architecture ``name`` (one of ARCHS), seeded."""
    import transformers as T

    torch.manual_seed(seed)
    common = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=64)
    drop = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if name == "bert":
        model = T.BertForSequenceClassification(T.BertConfig(vocab_size=100, num_labels=3, **common, **drop))
    elif name == "roberta":
        model = T.RobertaForSequenceClassification(T.RobertaConfig(vocab_size=100, num_labels=3, **common, **drop))
    elif name == "distilbert":
        model = T.DistilBertForSequenceClassification(T.DistilBertConfig(
            vocab_size=100, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=64, dropout=0.0,
            attention_dropout=0.0, seq_classif_dropout=0.0, num_labels=3))
    elif name == "gpt2":
        model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                               bos_token_id=0, eos_token_id=0))
    elif name == "vit":
        model = T.ViTForImageClassification(T.ViTConfig(image_size=8, patch_size=4, num_labels=3, **common, **drop))
    elif name == "llama":
        model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=100, num_key_value_heads=2, **common,
                                                 attention_bias=True, mlp_bias=False))
    elif name == "encoder_layer":
        layer = nn.TransformerEncoderLayer(HIDDEN, HEADS, 64, dropout=0.0, batch_first=True)
        model = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
    elif name == "multihead_attention":
        model = MHAStack()
    else:
        raise ValueError(name)
    return model.eval()


def inputs(name: str, seed: int = 1) -> dict:
    """Model inputs: token ids (with padding for encoders), pixels, or float sequences."""
    g = torch.Generator().manual_seed(seed)
    if name in ("bert", "roberta", "distilbert"):
        ids = torch.randint(5, 100, (3, 9), generator=g)
        mask = torch.ones(3, 9, dtype=torch.long)
        mask[1, 6:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    if name in ("gpt2", "llama"):
        return {"input_ids": torch.randint(5, 100, (2, 7), generator=g)}
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=g)}
    return {"x": torch.randn(2, 5, HIDDEN, generator=g)}


def run(name: str, model: nn.Module, batch: dict) -> torch.Tensor:
    """The model's output tensor on ``batch`` (no grad)."""
    with torch.no_grad():
        if name in ("encoder_layer", "multihead_attention"):
            return model(batch["x"])
        return model(**batch).logits

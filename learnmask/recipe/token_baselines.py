"""Fixed token scorers for the baselines of the token-pruning recipe: they take the place of the
learned :class:`~learnmask.inject.tokens.TokenScorer` of each pruning layer (same call: hidden
states ``(B, S, d)`` → scores ``(B, S)``), with the ``topk`` gate kind, so training and eval keep
exactly ``max(1, round(r * n_real))`` tokens per example (CLS always, padding never).

Legend: ``B`` batch, ``S`` tokens of the current tensor, ``d`` hidden size, ``H`` heads, ``D``
head size.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from learnmask.inject.architectures import LayerSpec
from learnmask.sampling import generator_for


class RandomScorer(nn.Module):
    """Random tokens: uniform scores, fresh at every training pass (from the torch RNG, which the
    run seeds); in eval drawn from a generator seeded with ``seed`` at every call, so the gated
    model and its export choose the same tokens for the same batch. No parameters.
    """

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = int(seed)

    def forward(self, hidden: Tensor) -> Tensor:
        shape = hidden.shape[:2]
        if self.training:  # per-example draws: the step's own stream in the shared loop
            noise = generator_for(hidden.device, "per_example")
            return torch.rand(shape, generator=noise, device=hidden.device)
        generator = torch.Generator(device=hidden.device).manual_seed(self.seed)
        return torch.rand(shape, generator=generator, device=hidden.device)


class AttentionReceivedScorer(nn.Module):
    """EViT-style importance (Liang et al., 2022, "Not All Patches are What You Need"): the
    attention each token receives from the first (CLS) token, averaged over heads.

    EViT reads the CLS attention of the layer that prunes; a scorer sees that layer's output,
    so this one uses the next layer's query and key maps (after its pre-norm, for pre-norm
    models like ViT) on that output: the attention CLS is about to pay each token. Padding is
    not masked in the softmax (a scorer sees no mask); it is never kept, and it only changes the
    per-head normalisation. Scores carry no gradient: the model's weights are read, not trained
    through the scorer. The next layer's modules are referenced, not registered, so the scorer
    adds no parameters to the model (an export's copy holds copies of them).

    Args:
        layer: the layer after the pruning layer (:func:`learnmask.inject.architectures.find_layers`).

    Raises:
        ValueError: the layer has no attention with separate query and key maps.
    """

    def __init__(self, layer: LayerSpec) -> None:
        super().__init__()
        spec = layer.attention
        if spec is None or spec.fused or spec.q is None or spec.k is None or spec.q.offset or spec.k.offset:
            raise ValueError(f"attention-received scores need separate query and key maps in {layer.name}; "
                             f"{type(layer.module).__name__} has none")
        norm = layer.norms[0] if layer.arch == "vit" else None  # ViT is pre-norm; BERT/DistilBERT post-norm
        self.__dict__["parts"] = (spec.q.module, spec.k.module, norm)  # read, not owned
        self.heads, self.head_dim = spec.num_heads, spec.head_dim

    @torch.no_grad()
    def forward(self, hidden: Tensor) -> Tensor:
        query, key, norm = self.parts
        x = norm(hidden) if norm is not None else hidden
        q = rearrange(query(x[:, :1]), "b s (h d) -> b h s d", h=self.heads)
        k = rearrange(key(x), "b s (h d) -> b h s d", h=self.heads)
        attention = torch.softmax((q @ k.transpose(-1, -2)).float() / self.head_dim ** 0.5, dim=-1)  # (B, H, 1, S)
        return attention.mean(dim=1)[:, 0]

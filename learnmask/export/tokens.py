"""Token pruning without learnmask's hooks: the export of a token-gated model.

:func:`drop_tokens` replaces the layer list of a model (``bert.encoder.layer``,
``distilbert.transformer.layer``, ``vit.layers``, an ``nn.TransformerEncoder``'s ``layers``) by a
one-element ``nn.ModuleList`` holding a :class:`TokenDroppingLayers`: the same layers, with copies
of the token scorers, that after each pruning layer keeps per example the first token and the
top-scored others (exactly ``max(1, round(r * n_real))``, in their original order), gathers them
and runs the later layers on the shorter batch with a padding mask of its own. The rest of the
model (embeddings, mask construction, final norm, pooler, task head) is untouched and runs its
own attention implementation (``"sdpa"`` or ``"eager"`` for Hugging Face models). This is the
rule of the gated model's eval pass with ``token_inference="drop"``
(:func:`learnmask.inject.tokens.eval_keep` and :func:`~learnmask.inject.tokens.gather_kept`
are shared), so the outputs agree up to float rounding (DynamicViT, Rao et al. 2021; LTP, Kim
et al. 2022; PoWER-BERT, Goyal et al. 2020).

What changes for a caller: the sequence after the first pruning layer is shorter, so per-token
outputs (``last_hidden_state``, token classification) hold the kept tokens only; outputs read
from the first (CLS) token are those of the gated model.

Legend: ``B`` batch, ``S`` tokens of the current tensor, ``d`` hidden size.
"""
from __future__ import annotations

import copy

from torch import Tensor, nn

from learnmask.inject.architectures import LayerSpec
from learnmask.inject.hf_attention import real_keys
from learnmask.inject.token_hooks import valid_from_padding_mask
from learnmask.inject.tokens import TokenGates, eval_keep, gather_kept

__all__ = ["TokenDroppingLayers", "drop_tokens"]

#: Attention implementations of a Hugging Face model the export runs with (their masks are
#: tensors or None, from which the real tokens are read).
IMPLEMENTATIONS = ("sdpa", "eager")


class TokenDroppingLayers(nn.Module):
    """A model's transformer layers with token pruning after some of them (see the module).

    Args:
        layers: the model's layers, in order (modules taking ``(hidden, mask, ...)`` for Hugging
            Face models, ``nn.TransformerEncoderLayer`` with ``batch_first=True`` otherwise).
        scorers: one :class:`~learnmask.inject.tokens.TokenScorer` per pruning layer.
        token_layers: indices of the pruning layers, strictly increasing, each < ``len(layers) - 1``.
        ratios: fraction of the input's real tokens kept after each pruning layer, in (0, 1].
        config: the Hugging Face config whose attention implementation builds the masks of the
            shorter batch; None for ``nn.TransformerEncoderLayer`` stacks.

    Called as the model calls its layers: ``(hidden (B, S, d), attention_mask, *rest,
    **kwargs)`` for Hugging Face models (``attention_mask`` a ``(B, 1, S or 1, S)`` bool or
    additive mask, or None), ``(src (B, S, d), src_mask=None, is_causal=False,
    src_key_padding_mask=(B, S) or None)`` for encoder layers. Returns ``(B, S', d)``: the kept
    tokens after the last layer (first token first, then in original order; examples that keep
    fewer are padded with copies of their first token, which the masks hide).

    The decisions follow the eval rule in training mode too (the export is for inference; train
    the gated model). ``ratios`` are configuration, not state: a ``state_dict`` carries the
    layers and scorers, and loads into an export made with the same ratios.

    Raises:
        ValueError: (when called) a ``src_mask`` or ``is_causal=True`` on an encoder-layer stack
            (square masks do not follow gathered tokens), or left padding (the first token of an
            example is padding).
    """

    def __init__(self, layers: list[nn.Module], scorers: nn.ModuleList, token_layers: tuple[int, ...],
                 ratios: tuple[float, ...], config=None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.scorers = scorers
        self.token_layers, self.ratios, self.config = tuple(token_layers), tuple(ratios), config

    @property
    def self_attn(self) -> nn.Module:
        """The first layer's attention (``nn.TransformerEncoder.forward`` reads
        ``layers[0].self_attn.batch_first``)."""
        return self.layers[0].self_attn

    def forward(self, hidden: Tensor, *args, **kwargs) -> Tensor:
        if self.config is None:
            return self._encoder_layers(hidden, *args, **kwargs)
        mask = args[0] if args else kwargs.pop("attention_mask", None)
        rest = args[1:]
        valid = _first_is_real(real_keys(mask, hidden.shape[0], hidden.shape[1], hidden.device))
        n_real, tupled = valid.sum(dim=1), False
        for row, layer in enumerate(self.layers):
            out = layer(hidden, mask, *rest, **kwargs)
            tupled = isinstance(out, tuple)
            hidden = out[0] if tupled else out
            if row in self.token_layers:
                hidden, valid = self._prune(row, hidden, valid, n_real)
                mask = self._mask(hidden, valid)
        return (hidden,) if tupled else hidden

    def _encoder_layers(self, src: Tensor, src_mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                        is_causal: bool | None = None) -> Tensor:
        if src_mask is not None or is_causal:
            raise ValueError("a token-dropping nn.TransformerEncoderLayer stack takes a key padding mask only; got "
                             "src_mask or is_causal=True (attention masks over positions do not follow pruned tokens)")
        mask = src_key_padding_mask
        valid = _first_is_real(valid_from_padding_mask(mask, src.shape[0], src.shape[1], src.device))
        n_real = valid.sum(dim=1)
        for row, layer in enumerate(self.layers):
            src = layer(src, src_key_padding_mask=mask)
            if row in self.token_layers:
                src, valid = self._prune(row, src, valid, n_real)
                mask = None if bool(valid.all()) else ~valid
        return src

    def _prune(self, row: int, hidden: Tensor, valid: Tensor, n_real: Tensor) -> tuple[Tensor, Tensor]:
        stage = self.token_layers.index(row)
        hard = eval_keep(self.scorers[stage](hidden), valid, n_real, self.ratios[stage])
        gathered, _, valid = gather_kept(hard, hidden)
        return gathered, valid

    def _mask(self, hidden: Tensor, valid: Tensor):
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=valid)


def _first_is_real(valid: Tensor) -> Tensor:
    if not bool(valid[:, 0].all()):
        rows = (~valid[:, 0]).nonzero().flatten().tolist()
        raise ValueError(f"token pruning keeps the first token of every example (CLS); examples {rows} have padding "
                         "there: pad on the right")
    return valid


def drop_tokens(model: nn.Module, layers: list[LayerSpec], tokens: TokenGates) -> nn.Module:
    """Put a :class:`TokenDroppingLayers` in place of ``model``'s layer list (in place).

    Args:
        model: a model with no learnmask hooks (a finalized copy), whose ``layers`` are the
            children of one ``nn.ModuleList``, in order.
        layers: ``model``'s layers (``find_layers``).
        tokens: the gated model's token gates; their scorers are copied.

    Returns:
        ``model``.

    Raises:
        ValueError: the layers are not one ``nn.ModuleList`` attribute of a module, or a Hugging
            Face model attends with an implementation other than ``"sdpa"`` or ``"eager"``.
    """
    parent = layers[0].name.rpartition(".")[0]
    container = model.get_submodule(parent) if parent else model
    if not parent or not isinstance(container, nn.ModuleList) or \
            [id(m) for m in container] != [id(layer.module) for layer in layers]:
        raise ValueError(f"token pruning is exported by replacing the model's list of layers; the layers of "
                         f"{type(model).__name__} ({layers[0].name}, ...) are not the children of one nn.ModuleList "
                         "attribute")
    config = None
    if layers[0].arch != "transformer_encoder_layer":
        config = getattr(model, "config", None)
        implementation = getattr(config, "_attn_implementation", None)
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"token pruning is exported for Hugging Face models attending with {IMPLEMENTATIONS}; "
                             f"{type(model).__name__} attends with {implementation!r}: load it with "
                             "attn_implementation='sdpa'")
    scorers = copy.deepcopy(tokens.scorers)
    stack = TokenDroppingLayers(list(container), scorers, tokens.layers, tokens.ratios, config)
    owner, _, attr = parent.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, nn.ModuleList([stack]))
    for module in model.modules():  # nested tensors would skip the pruning's padding masks
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False
    return model


def is_token_dropping(model: nn.Module) -> bool:
    """Whether ``model`` holds a :class:`TokenDroppingLayers` (an export of token gates)."""
    return any(isinstance(module, TokenDroppingLayers) for module in model.modules())

"""The hooks by which token gates act (see :mod:`learnmask.inject.tokens`).

- :class:`PruneTokens`, a forward hook on each pruning layer: scores its output tokens and
  records the keep decision (training and ``"mask"`` mode), or gathers the kept tokens
  (``"drop"`` mode in eval) so the later layers run on the shorter sequence.
- Hugging Face layers after the first pruning layer get the keep values (or the gathered
  padding mask) through their route (:meth:`learnmask.inject.hf_attention.Route.token_inputs`).
- :class:`EncoderLayerTokens`, a forward pre-hook on each ``nn.TransformerEncoderLayer`` after
  the first pruning layer: passes the keep values as an additive key-padding mask ``log z``
  (``-inf`` where z = 0), or the gathered padding.

Legend: ``B`` batch, ``S`` tokens in the current tensor, ``S0`` tokens of the input, ``d``
hidden size.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from learnmask.inject.architectures import LayerSpec
from learnmask.inject.hf_attention import AttentionPath
from learnmask.inject.hooks import LearnmaskHook
from learnmask.inject.tokens import TOKEN_ARCHS, TokenGates, eval_keep, gather_kept, keep_counts


def check_token_layers(model: nn.Module, layers: list[LayerSpec], tokens: TokenGates,
                       paths: dict[str, AttentionPath]) -> None:
    """Raise ``ValueError`` where the model's tokens cannot be gated as configured."""
    kind = type(model).__name__
    if tokens.layers[-1] >= len(layers) - 1:
        where = "is its last layer" if tokens.layers[-1] == len(layers) - 1 else "is past the model's depth"
        raise ValueError(f"token_layers {list(tokens.layers)}: index {tokens.layers[-1]} {where}; "
                         f"{kind} has {len(layers)} layers, so tokens can be pruned after layers 0..{len(layers) - 2} "
                         "(some layer must run after pruning)")
    for layer in layers:
        if layer.arch not in TOKEN_ARCHS:
            raise ValueError(f"token gates support {', '.join(TOKEN_ARCHS)} layers (BERT, RoBERTa, DistilBERT, "
                             f"ViT, nn.TransformerEncoderLayer: bidirectional encoders whose first token, CLS, "
                             f"summarizes the input and is never closed); {layer.name} of {kind} is {layer.arch!r}")
        if layer.arch == "transformer_encoder_layer":
            if not layer.module.self_attn.batch_first:
                raise ValueError(f"token gates need batch_first=True on {layer.name} (nn.TransformerEncoderLayer); "
                                 "got batch_first=False")
            continue
        path = paths.get(layer.name)
        if path is None or path.path != "op":
            reason = path.reason if path is not None else "it has no attention block"
            raise ValueError(f"token gates on {kind} need every layer to attend through learnmask's op "
                             f"(attention='auto' or 'op'); {layer.name} does not: {reason}")


def attach(handle) -> list:
    """Hook ``handle``'s token gates on: a :class:`PruneTokens` on each pruning layer, an
    :class:`EncoderLayerTokens` on each ``nn.TransformerEncoderLayer`` after the first (Hugging
    Face layers get theirs through their routes). Returns the hook handles."""
    tokens, hooks = handle.tokens, []
    for row, layer in enumerate(handle.layers):
        encoder = layer.arch == "transformer_encoder_layer"
        stage = tokens.stage_of(row)
        if stage is not None:
            hook = PruneTokens(handle, row, stage, "src_key_padding_mask" if encoder else None)
            hooks.append(layer.module.register_forward_hook(hook, with_kwargs=True))
        if encoder and row > tokens.layers[0]:
            hooks.append(layer.module.register_forward_pre_hook(EncoderLayerTokens(handle, "tokens", row),
                                                                with_kwargs=True))
    return hooks


def log_keep(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """``(B, S)`` ``log z`` where z > 0 and ``-inf`` where z = 0, with zero (finite) gradient at
    z = 0, in ``dtype``."""
    tiny = torch.finfo(keep.dtype).tiny
    log = torch.log(keep.clamp_min(tiny))
    return torch.where(keep > 0, log, torch.full_like(log, -torch.inf)).to(dtype)


def valid_from_padding_mask(mask: Tensor | None, batch: int, length: int, device) -> Tensor:
    """``(B, S)`` bool real tokens from an ``nn.MultiheadAttention``-style key padding mask
    (bool True = ignore, or additive float with ``-inf``/very negative = ignore), or all."""
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if mask.dtype == torch.bool:
        return ~mask
    return mask > torch.finfo(mask.dtype).min / 2


class PruneTokens(LearnmaskHook):
    """Forward hook (with kwargs) on pruning layer ``row``, stage ``stage`` of the token gates.

    Output ``(B, S, d)`` (batch first). Training: keep values ``z`` ``(B, S)`` sampled from the
    scorer's logits, CLS forced to 1, padding to 0, times the previous stages' values. Eval:
    top-k per example; in ``"drop"`` mode the output is returned gathered, ``(B, S', d)``.
    """

    def __init__(self, handle, row: int, stage: int, padding_argument: str | None) -> None:
        super().__init__(handle, "tokens", row)
        self.stage, self.padding_argument = stage, padding_argument

    def _observe(self, state, args: tuple, kwargs: dict, hidden: Tensor) -> None:
        if state.valid is not None:
            return
        mask = None
        if self.padding_argument is not None:  # nn.TransformerEncoderLayer(src, src_mask, src_key_padding_mask)
            mask = kwargs.get(self.padding_argument, args[2] if len(args) > 2 else None)
        state.observe(valid_from_padding_mask(mask, hidden.shape[0], hidden.shape[1], hidden.device))

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output):
        hidden = output[0] if isinstance(output, tuple) else output
        handle = self.handle
        state, tokens = handle.token_state, handle.tokens
        self._observe(state, args, kwargs, hidden)
        log_alpha = tokens.scorers[self.stage](hidden)
        counts = keep_counts(state.n_real, tokens.ratios[self.stage])
        previous = state.keep
        open_ = state.valid if previous is None else state.valid & (previous > 0)
        first = torch.zeros_like(open_)
        first[:, 0] = True
        eligible = open_ & ~first
        if module.training:
            z = tokens.sample(log_alpha, eligible, counts)
            p = tokens.keep_probability(log_alpha, eligible, counts)
            z, p = (torch.where(first, torch.ones_like(v), torch.where(state.valid, v, torch.zeros_like(v)))
                    for v in (z, p))
            state.keep = z if previous is None else previous * z
            state.probability = p if state.probability is None else state.probability * p
            state.expected.append(state.probability.float().sum(dim=1))
            state.kept.append(state.keep.detach() > 0)
            return None
        hard = eval_keep(log_alpha, open_, state.n_real, tokens.ratios[self.stage])
        state.expected.append(hard.sum(dim=1).float())
        if handle.token_inference == "mask":
            state.keep = hard.to(hidden.dtype)
            state.kept.append(hard)
            return None
        gathered = self._gather(state, hard, hidden)
        return (gathered, *output[1:]) if isinstance(output, tuple) else gathered

    @staticmethod
    def _gather(state, hard: Tensor, hidden: Tensor) -> Tensor:
        """Keep the tokens ``hard`` ``(B, S)`` of ``hidden`` ``(B, S, d)`` (:func:`gather_kept`)
        and record their original positions."""
        gathered, index, valid = gather_kept(hard, hidden)
        original = index if state.index is None else torch.gather(state.index, 1, index)
        kept = torch.zeros(hard.shape[0], state.length, dtype=torch.long, device=hard.device)
        kept.scatter_add_(1, original, valid.long())
        state.kept.append(kept > 0)
        state.index, state.valid, state.dropped = original, valid, True
        return gathered


class EncoderLayerTokens(LearnmaskHook):
    """Forward pre-hook (with kwargs) on an ``nn.TransformerEncoderLayer`` after the first
    pruning layer: ``src_key_padding_mask`` becomes ``log z`` ``(B, S)`` (training, ``"mask"``)
    or the gathered padding (``"drop"``).

    Raises:
        ValueError: the layer is called with ``src_mask`` or ``is_causal`` (a square mask does
            not follow the tokens once they are gathered).
    """

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        state = self.handle.token_state
        if state.keep is None and not state.dropped:
            return None
        src, rest = args[0], args[1:]
        src_mask = kwargs.pop("src_mask", rest[0] if rest else None)
        if src_mask is not None or kwargs.get("is_causal"):
            raise ValueError("token gates on nn.TransformerEncoderLayer take a key padding mask only; got src_mask "
                             "or is_causal=True (attention masks over positions do not follow pruned tokens)")
        kwargs.pop("src_key_padding_mask", None)
        if state.dropped:
            mask = None if bool(state.valid.all()) else ~state.valid
        else:
            mask = log_keep(state.keep, src.dtype)
        return (src,), {**kwargs, "src_key_padding_mask": mask}

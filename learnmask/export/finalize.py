"""``finalize``: bake a gated model's deterministic masks into its weights and physically remove
what they closed — attention heads, FFN units, hidden dimensions and whole blocks — returning a
smaller plain model of the same classes whose eval outputs equal the gated model's.

Decisions (documented in :func:`finalize`):
* A gate value z in (0, 1] is baked in (the unit's output columns times z); z = 0 removes it.
* Grouped-query attention (Llama): a key/value head stays while any of its query heads does;
  kept groups are padded with closed (zeroed) query heads to the largest group so the stock
  ``repeat_kv`` still pairs queries and keys (exact; padding costs a little compute).
* ``nn.MultiheadAttention`` ties its head count to the embedding width, so a block that keeps
  some of its heads is rebuilt as a ``torch.fx`` module with the stock signature
  (:func:`learnmask.export.mha.prune_heads`); a bare one given as the model itself is returned
  rebuilt.
* A block with nothing left becomes a ``torch.fx`` stub adding only its bias (pickles with torch).
* A model gated through ``target_modules``/``ffn_modules`` is pruned through the projections
  named in ``qkv_modules``/``ffn_up_modules`` (and ``head_count_attribute``); learnmask does not
  know its attention module, so an attention with every head closed keeps one zeroed head, and
  an FFN with every unit closed keeps zero-width linear maps.

Legend: ``H`` query heads, ``G`` key/value heads, ``D`` head size, ``I`` FFN units, ``d``
hidden size.
"""
from __future__ import annotations

import copy

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from learnmask.export import mha, record, stubs
from learnmask.export.hidden import prune_hidden
from learnmask.export.tokens import drop_tokens
from learnmask.inject import hooks
from learnmask.inject.architectures import AttentionSpec, FFNSpec, LayerSpec, find_layers, is_mha
from learnmask.inject.custom import custom_layers
from learnmask.inject.handle import GATES_ATTRIBUTE, TOKENS_ATTRIBUTE, MaskHandle
from learnmask.inject.hidden import find_hidden_stream
from learnmask.inject.layout import (
    bias_of,
    drop_bias,
    head_index,
    keep_inputs,
    keep_outputs,
    scale_inputs,
    scale_outputs,
)


def _kept_heads(keep: Tensor, heads: int, kv_heads: int) -> tuple[Tensor, Tensor]:
    """Query heads and key/value heads to keep, from a ``(H,)`` bool mask (GQA padded, see top)."""
    if kv_heads == heads:
        index = torch.nonzero(keep).flatten()
        return index, index
    groups = rearrange(keep, "(g r) -> g r", g=kv_heads)
    alive = torch.nonzero(groups.any(dim=1)).flatten()
    size = int(groups.sum(dim=1).max()) if len(alive) else 0
    queries = []
    for g in alive.tolist():
        # kept heads first, then closed ones of the same group as padding; each group sorted
        order = torch.argsort((~groups[g]).to(torch.int8), stable=True)[:size]
        queries.append(g * (heads // kv_heads) + torch.sort(order).values)
    return (torch.cat(queries) if queries else alive), alive


def _prune_attention(att: AttentionSpec, z_heads: Tensor, z_block: float) -> None:
    d_in = att.head_dim
    with torch.no_grad():
        scale_inputs(att.out, repeat(z_heads, "h -> (h d)", d=d_in))
        scale_outputs(att.out, z_block)
    keep = (z_heads > 0) & (z_block > 0)
    if not bool(keep.any()):
        if att.owner is not None:
            _replace_attention(att, bias_of(att.out) if z_block > 0 else None)
            return
        keep = torch.arange(att.num_heads) == 0  # target_modules: one zeroed head stays (see finalize)
    if is_mha(att.module):  # stock or already pruned nn.MultiheadAttention: rebuilt with fewer heads
        if not bool(keep.all()):
            setattr(att.owner, att.attr, mha.prune_heads(att.module, torch.nonzero(keep).flatten()))
        return
    queries, kv = _kept_heads(keep, att.num_heads, att.num_kv_heads)
    rows: dict[int, tuple[nn.Module, list[Tensor]]] = {}
    for proj, heads in ((att.q, queries), (att.k, kv), (att.v, kv)):
        index = head_index(heads.to(torch.long), d_in, proj.offset)
        rows.setdefault(id(proj.module), (proj.module, []))[1].append(index)
    for module, indices in rows.values():  # GPT-2's fused c_attn: q, k, v rows in one slice
        keep_outputs(module, torch.cat(indices))
    keep_inputs(att.out, head_index(queries.to(torch.long), d_in))
    if att.set_heads is not None:  # (a target_modules block may read its head count from shapes)
        att.set_heads(att.module, len(queries), len(kv))


def _replace_attention(att: AttentionSpec, bias: Tensor | None) -> None:
    if att.post_norm is not None:
        stub = stubs.post_norm_block(att.first_arg, att.post_norm, bias, class_name="RemovedAttention")
    else:
        extra = {}
        if att.functional_out:  # what nn.TransformerEncoder(Layer) reads from its self_attn
            block = att.module
            extra = {"batch_first": block.batch_first, "num_heads": block.num_heads, "in_proj_bias": None,
                     "_qkv_same_embed_dim": True, "embed_dim": att.out.weight.shape[0]}
        stub = stubs.zero_block(att.first_arg, bias, returns_tuple=True, class_name="RemovedAttention",
                                attributes=extra)
    setattr(att.owner, att.attr, stub)


def _prune_ffn(ffn: FFNSpec, z_units: Tensor, z_block: float) -> None:
    with torch.no_grad():
        scale_inputs(ffn.down, z_units)
        scale_outputs(ffn.down, z_block)
    keep = torch.nonzero((z_units > 0) & (z_block > 0)).flatten()
    if len(keep) == 0 and ffn.owner is not None:  # GPT-2: Conv1D cannot take zero-width input
        bias = bias_of(ffn.down) if z_block > 0 else None
        setattr(ffn.owner, ffn.attr, stubs.zero_block("hidden_states", bias, returns_tuple=False,
                                                      class_name="RemovedFFN"))
        return
    for up in ffn.up:
        keep_outputs(up, keep)
    keep_inputs(ffn.down, keep)
    if z_block == 0 and ffn.bias_removable and bias_of(ffn.down) is not None:
        drop_bias(ffn.down)


def _row(masks: dict[str, Tensor], name: str, row: int, size: int | None) -> Tensor:
    if name in masks:
        return masks[name][row].float()
    return torch.ones(size) if size is not None else torch.ones(())


def prune_layers(layers: list[LayerSpec], masks: dict[str, Tensor]) -> None:
    """Bake and remove heads, FFN units and blocks of ``layers`` in place (see module docstring)."""
    for row, layer in enumerate(layers):
        if layer.attention is not None and ({"heads", "attention_blocks"} & set(masks)):
            att = layer.attention
            _prune_attention(att, _row(masks, "heads", row, att.num_heads).to(att.out.weight.device),
                             float(_row(masks, "attention_blocks", row, None)))
        if layer.ffn is not None and ({"ffn", "ffn_blocks"} & set(masks)):
            ffn = layer.ffn
            _prune_ffn(ffn, _row(masks, "ffn", row, ffn.units).to(ffn.down.weight.device),
                       float(_row(masks, "ffn_blocks", row, None)))


def _handle_of(model: nn.Module) -> MaskHandle:
    """The handle whose gates ``model`` carries (found through its sampling hook)."""
    for hook in model._forward_pre_hooks.values():
        if isinstance(hook, hooks.SampleGates):
            return hook.handle
    raise ValueError(f"{type(model).__name__} carries no learnmask gates; gate it with apply_masks first "
                     "(or pass the handle)")


def _masks_and_names(handle: MaskHandle) -> tuple[dict[str, Tensor], list[str]]:
    if any(layer.arch == "custom" for layer in handle.layers):
        config, gated = handle.config, set(handle.gates)
        wiring = (("qkv_modules", "target_modules", {"heads", "attention_blocks"}),
                  ("ffn_up_modules", "ffn_modules", {"ffn", "ffn_blocks"}))
        missing = [f"{field} (for {base})" for field, base, needs in wiring
                   if gated & needs and getattr(config, field) is None]
        if missing:
            raise ValueError(f"finalize needs to know where the removed units are read: apply_masks with "
                             f"{' and '.join(missing)}; without it the model can only be evaluated with its gates")
    return handle.eval_masks(), [layer.name for layer in handle.layers]


def _layers_of(model: nn.Module, handle) -> list[LayerSpec]:
    if any(layer.arch == "custom" for layer in handle.layers):
        return custom_layers(model, handle.config)
    return find_layers(model)


def finalize(target: MaskHandle | nn.Module, *, inplace: bool = False) -> nn.Module:
    """A plain model with the gates' eval masks baked in and everything closed removed.

    Args:
        target: the handle from :func:`~learnmask.inject.apply_masks` (any granularity), or the
            gated model itself.
        inplace: prune the gated model itself (its gates are removed first) instead of a copy.

    Returns:
        The pruned model (same classes, fewer heads/units/dims; stubs where nothing is left;
        an ``nn.MultiheadAttention`` that lost some heads becomes a ``PrunedMultiheadAttention``
        fx module with the stock call signature, see :mod:`learnmask.export.mha`).
        Its eval outputs equal the gated model's in eval mode: exactly in float64 (<= 1e-10);
        in float32 up to summation order (a pruned matmul adds fewer terms), max abs diff
        <= 1e-5 on MiniLM-sized models; deeper ones amplify it as they amplify their own
        rounding (30-layer SmolLM2: within 5x the gated float32 model's own error against a
        float64 run). With hidden dims removed, a model whose output is the hidden stream
        itself (a bare ``BertModel``) returns the kept dims only: the gated output without its
        zero columns. It holds no learnmask object; its attribute ``learnmask_pruning`` (plain
        JSON-ready data, see :mod:`learnmask.export.record`) records what it kept of the
        original, so :func:`~learnmask.export.save_pruned` saves it as safetensors + JSON and
        :func:`~learnmask.export.load_pruned` rebuilds it (a Hugging Face config still states
        the original sizes, so ``save_pretrained``/``from_pretrained`` alone cannot).
        With token gates (BERT, RoBERTa, DistilBERT, ViT, ``nn.TransformerEncoderLayer``
        stacks), its list of layers is replaced by a
        :class:`~learnmask.export.tokens.TokenDroppingLayers` that drops tokens after the
        pruning layers as the gated model does in eval with ``token_inference="drop"`` (same
        outputs up to float rounding, <= 1e-5 in float32 on small models; per-token outputs hold
        the kept tokens only); heads, FFN units and blocks are pruned as above. Such a model is
        saved as a ``state_dict`` loaded into a fresh export (``save_pruned`` refuses it).

    Raises:
        TypeError: ``target`` is neither a handle nor a model (``None``, say).
        ValueError: a handle with token gates and hidden-dimension gates, or with weight or diff
            masks (``apply_masks(..., weight_masks=...)``), a model without gates, one
            gated through ``target_modules``/``ffn_modules`` without
            ``qkv_modules``/``ffn_up_modules`` (learnmask does not know where its q/k/v and up
            projections are), or a model whose layers changed since it was gated.
    """
    if not isinstance(target, (MaskHandle, nn.Module)):
        raise TypeError(f"finalize expects the handle of apply_masks (or apply_head_gates), or the gated model "
                        f"(an nn.Module); got {type(target).__name__}")
    handle = _handle_of(target) if isinstance(target, nn.Module) else target
    masked = [family for family in ("weight_masks", "diff_masks") if getattr(handle, family, None) is not None]
    if masked:
        raise ValueError(f"finalize prunes unit gates, and this handle also carries {' and '.join(masked)}, whose "
                         "parametrizations the pruning would cut through; export_weights() bakes parameter masks "
                         "into plain weights when they are applied on their own")
    tokens = getattr(handle, "tokens", None)
    if tokens is not None and "hidden" in handle.gates:
        raise ValueError("finalize cannot export hidden-dimension gates together with token gates (the token "
                         "scorers read every hidden dimension); gate tokens with heads/FFN/blocks only")
    masks, names = _masks_and_names(handle)
    if inplace:
        handle.remove()
        model = handle.model
    else:
        # copy the model without its hooks: a parametrized module's class is shared with its
        # deep copy, so un-parametrizing a copy would break the original
        with handle.detached():
            model = copy.deepcopy(handle.model)
        hooks.strip(model)
        stubs.restore_class_names(model)  # stubs of an earlier finalize: "RemovedAttention", not "GraphModule"
        for attribute in (GATES_ATTRIBUTE, TOKENS_ATTRIBUTE):
            if hasattr(model, attribute):
                delattr(model, attribute)
    layers = _layers_of(model, handle)
    found = [layer.name for layer in layers]
    if found != names:
        raise ValueError(f"the model's layers changed since gating: {found} != {names}")
    if any(layer.arch == "custom" for layer in layers):
        before = record.unsupported("it was pruned through target_modules/ffn_modules, whose layers learnmask "
                                    "cannot rebuild from a config")
    else:
        before = record.record_of(model) or record.initial(model, layers)
    pruned, kept = prune(model, layers, masks)
    record.attach(pruned, record.updated(before, [layer.name for layer in layers], kept))
    if tokens is not None:
        drop_tokens(pruned, layers, tokens)
        record.attach(pruned, record.unsupported("it drops tokens (an export of token gates); save its state_dict "
                                                 "and load it into a fresh export of the same gated model"))
    return pruned


def prune(model: nn.Module, layers: list[LayerSpec], masks: dict[str, Tensor | list[Tensor]]
          ) -> tuple[nn.Module, record.Kept]:
    """Bake ``masks`` into ``model`` (hooks already off) and remove what they close, in place.

    The one pruning path: :func:`finalize` runs it on the gated model's copy and
    :func:`learnmask.export.load_pruned` on the rebuilt original architecture, with 0/1 masks
    of the units a saved model kept.

    Args:
        model: the model whose ``layers`` (from ``find_layers``/``custom_layers``) these are.
        masks: granularity name -> gate values, one row per layer (a ``(L, ...)`` tensor or a
            list of per-layer tensors); ``hidden``: ``(d,)``. Missing granularities stay whole.

    Returns:
        The pruned model (``model`` itself unless it was a bare ``nn.MultiheadAttention``,
        which is rebuilt) and what each layer kept, in the layer's own indices before pruning.
    """
    hidden = None
    if "hidden" in masks:
        hidden = torch.nonzero(masks["hidden"] > 0).flatten()
        prune_hidden(model, layers, find_hidden_stream(model, layers), masks["hidden"].float())
    holder = None
    for layer in layers:  # the model is itself the attention block: let it be replaced too
        if layer.attention is not None and layer.attention.owner is None and layer.module is model and is_mha(model):
            holder = nn.Module()
            holder.model = model
            layer.attention.owner, layer.attention.attr = holder, "model"
    kept = record.Kept(hidden, [_kept_in_layer(layer, row, masks) for row, layer in enumerate(layers)])
    prune_layers(layers, masks)
    for module in model.modules():  # a rebuilt or emptied self_attn takes no nested tensors
        if isinstance(module, nn.TransformerEncoder) and any(
                not isinstance(layer.self_attn, nn.MultiheadAttention) for layer in module.layers):
            module.use_nested_tensor = False
    return (model if holder is None else holder.model), kept


def _kept_in_layer(layer: LayerSpec, row: int, masks: dict) -> record.LayerKept:
    """What :func:`prune_layers` keeps of ``layer`` (same rules), in its indices before pruning."""
    attention = ffn = None
    att = layer.attention
    if att is not None and ({"heads", "attention_blocks"} & set(masks)):
        z_block = float(_row(masks, "attention_blocks", row, None))
        keep = (_row(masks, "heads", row, att.num_heads) > 0) & (z_block > 0)
        if not bool(keep.any()):
            heads = [] if att.owner is not None else [0]  # target_modules: one zeroed head stays
        elif is_mha(att.module):
            heads = torch.nonzero(keep).flatten().tolist()
        else:
            heads = _kept_heads(keep, att.num_heads, att.num_kv_heads)[0].tolist()
        attention = (heads, z_block > 0)
    if layer.ffn is not None and ({"ffn", "ffn_blocks"} & set(masks)):
        z_block = float(_row(masks, "ffn_blocks", row, None))
        keep = (_row(masks, "ffn", row, layer.ffn.units) > 0) & (z_block > 0)
        ffn = (torch.nonzero(keep).flatten().tolist(), z_block > 0)
    return record.LayerKept(attention, ffn)

"""Where heads, FFN units and the hidden stream live in each supported architecture.

One small adapter per architecture turns a transformer layer into a :class:`LayerSpec`; nothing
here changes a model. Supported (found by structure, class names given for orientation):
Hugging Face BERT/RoBERTa (``BertLayer``), DistilBERT (``TransformerBlock``), GPT-2
(``GPT2Block``), ViT (``ViTLayer``), Llama with grouped key/value heads (``LlamaDecoderLayer``),
``torch.nn.TransformerEncoderLayer`` and a bare ``torch.nn.MultiheadAttention`` (heads only);
also the forms ``finalize`` leaves behind (emptied blocks as stubs, an ``nn.MultiheadAttention``
with heads removed as a ``PrunedMultiheadAttention`` fx module), so a pruned model is gated again
(layer by layer where its layers now differ in size).

Legend: ``H`` query heads, ``G`` key/value heads (groups; G = H without GQA), ``D`` head size,
``I`` FFN intermediate units, ``d`` hidden size.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import Tensor, fx, nn

from learnmask.inject.layout import in_features, out_features

SUPPORTED = ("BertLayer/RobertaLayer", "DistilBERT TransformerBlock", "GPT2Block", "ViTLayer",
             "LlamaDecoderLayer", "nn.TransformerEncoderLayer", "nn.MultiheadAttention")


@dataclasses.dataclass
class Rows:
    """Output rows ``[offset, offset + width)`` of a linear map (one of q, k, v)."""

    module: nn.Module
    offset: int = 0


@dataclasses.dataclass
class AttentionSpec:
    """One attention block.

    Attributes:
        owner, attr: ``getattr(owner, attr)`` is the attention module (what a stub replaces).
        q, k, v: output rows of the query/key/value projections (None for ``fused``).
        out: the output projection, whose input is the concatenation of the H heads.
        num_heads, num_kv_heads, head_dim: H, G, D.
        post_norm: the LayerNorm inside the attention module applied to ``input + output``
            (BERT's ``attention.output.LayerNorm``), else None (residual added outside).
        fused: a stock ``nn.MultiheadAttention``: q/k/v live in its ``in_proj_weight`` (or
            ``q/k/v_proj_weight``); ``finalize`` rebuilds it to remove heads.
        functional_out: the module reads ``out.weight`` itself instead of calling ``out``
            (``nn.MultiheadAttention`` and its pruned form), so gates act by a parametrization.
        set_heads: ``(module, H, G)`` updates the module's own head-count attributes.
        first_arg: name of the module's first forward argument (for a stub's signature).
    """

    owner: nn.Module | None
    attr: str
    q: Rows | None
    k: Rows | None
    v: Rows | None
    out: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    post_norm: nn.Module | None = None
    fused: bool = False
    functional_out: bool = False
    set_heads: Callable[[nn.Module, int, int], None] | None = None
    first_arg: str = "hidden_states"

    @property
    def module(self) -> nn.Module | None:
        """The attention module now (None when the model itself is the attention module)."""
        return None if self.owner is None else getattr(self.owner, self.attr)


@dataclasses.dataclass
class FFNSpec:
    """One feed-forward block: ``down(act(up_1(x)) [* up_2(x)])``.

    Attributes:
        owner, attr: the module a stub replaces when no unit is left (None: zero-width linear
            maps work as they are).
        up: linear maps whose outputs are the I units (two for Llama's gated MLP).
        down: linear map whose inputs are the I units.
        bias_removable: a closed block's (zero) down-projection bias can be set to None.
    """

    owner: nn.Module | None
    attr: str | None
    up: list[nn.Module]
    down: nn.Module
    bias_removable: bool = True

    @property
    def units(self) -> int:
        return in_features(self.down)


@dataclasses.dataclass
class LayerSpec:
    """One transformer layer: its attention, FFN and what it puts on the residual stream.

    Attributes:
        attention, ffn: the blocks with units left (None where finalize emptied one).
        norms: every norm on the residual stream, a post-norm stub's own included.
        stubs: the stubs finalize left for this layer's emptied blocks (see :func:`is_stub`).
            Each adds its output bias ``bias`` ``(d,)`` to the stream unless the block gate
            closed it; BERT's also applies its post-norm ``norm`` (listed in ``norms``). They
            are part of the hidden stream like the blocks they replace.
    """

    name: str
    arch: str
    module: nn.Module
    attention: AttentionSpec | None
    ffn: FFNSpec | None
    norms: list[nn.Module]
    stubs: list[nn.Module] = dataclasses.field(default_factory=list)

    @property
    def stub_biases(self) -> list[nn.Module]:
        """The stubs that still add an output bias ``bias`` ``(d,)`` to the stream."""
        return [stub for stub in self.stubs if getattr(stub, "bias", None) is not None]

    @property
    def attention_module(self) -> nn.Module | None:
        """The attention module now: its owner's attribute, or the layer itself for a bare
        ``nn.MultiheadAttention`` given as the model; None without one (or for a
        ``target_modules`` layer, whose attention module learnmask does not know)."""
        if self.attention is None:
            return None
        if self.attention.owner is not None:
            return self.attention.module
        return self.module if is_mha(self.module) else None

    @property
    def hidden_size(self) -> int:
        """d, the width of the residual stream this layer writes to."""
        if self.attention is not None:
            return out_features(self.attention.out)
        if self.ffn is not None:
            return out_features(self.ffn.down)
        if self.norms:
            return self.norms[0].weight.shape[0]  # both blocks are finalize stubs
        return self.module.embed_dim  # a bare nn.MultiheadAttention that finalize emptied


def is_pruned_attention(module: nn.Module | None) -> bool:
    """An ``nn.MultiheadAttention`` whose heads ``finalize`` removed (see ``learnmask.export.mha``);
    recognised by its parts, so a model saved by an older learnmask is recognised too."""
    return (
        isinstance(module, fx.GraphModule)
        and all(
            isinstance(getattr(getattr(module, name, None), "weight", None), Tensor)
            for name in ("q_proj", "k_proj", "v_proj", "out_proj")
        )
        and isinstance(getattr(module, "q_identity", None), Tensor)
        and isinstance(getattr(module, "num_heads", None), int)
    )


def is_mha(module: nn.Module | None) -> bool:
    """A stock ``nn.MultiheadAttention`` or its pruned form."""
    return isinstance(module, nn.MultiheadAttention) or is_pruned_attention(module)


def _is_removed_mha(module: nn.Module) -> bool:
    """The stub of an ``nn.MultiheadAttention`` with no head left (it keeps the attributes that
    ``nn.TransformerEncoder`` reads, ``_qkv_same_embed_dim`` among them)."""
    return is_stub(module) and hasattr(module, "_qkv_same_embed_dim")


def is_stub(module: nn.Module | None) -> bool:
    """A block finalize replaced because nothing was left in it (a ``torch.fx.GraphModule`` that
    is not a pruned attention block)."""
    return isinstance(module, fx.GraphModule) and not is_pruned_attention(module)


def _stubs(*modules: nn.Module) -> list[nn.Module]:
    return [module for module in modules if is_stub(module)]


def _bert(layer: nn.Module, name: str) -> LayerSpec:
    att, spec = layer.attention, None
    norms = [layer.output.LayerNorm]
    if not is_stub(att):
        self_att = att.self
        heads, dim = self_att.num_attention_heads, self_att.attention_head_size

        def set_heads(module, h, g):
            module.self.num_attention_heads, module.self.all_head_size = h, h * dim

        spec = AttentionSpec(layer, "attention", Rows(self_att.query), Rows(self_att.key), Rows(self_att.value),
                             att.output.dense, heads, heads, dim, post_norm=att.output.LayerNorm, set_heads=set_heads)
        norms.insert(0, att.output.LayerNorm)
    else:  # the stub is LayerNorm(x + b): the same post-norm on the stream
        norms.insert(0, att.norm)
    ffn = FFNSpec(None, None, [layer.intermediate.dense], layer.output.dense)
    return LayerSpec(name, "bert", layer, spec, ffn, norms, _stubs(att))


def _distilbert(layer: nn.Module, name: str) -> LayerSpec:
    att, spec = layer.attention, None
    if not is_stub(att):
        def set_heads(module, h, g):
            module.n_heads = h

        spec = AttentionSpec(layer, "attention", Rows(att.q_lin), Rows(att.k_lin), Rows(att.v_lin), att.out_lin,
                             att.n_heads, att.n_heads, att.attention_head_size, set_heads=set_heads)
    ffn = FFNSpec(None, None, [layer.ffn.lin1], layer.ffn.lin2)
    return LayerSpec(name, "distilbert", layer, spec, ffn, [layer.sa_layer_norm, layer.output_layer_norm], _stubs(att))


def _gpt2(layer: nn.Module, name: str) -> LayerSpec:
    att, spec, ffn = layer.attn, None, None
    if not is_stub(att):
        heads, dim, width = att.num_heads, att.head_dim, att.split_size

        def set_heads(module, h, g):
            module.num_heads, module.split_size = h, h * dim

        spec = AttentionSpec(layer, "attn", Rows(att.c_attn, 0), Rows(att.c_attn, width),
                             Rows(att.c_attn, 2 * width), att.c_proj, heads, heads, dim, set_heads=set_heads)
    if not is_stub(layer.mlp):
        # Conv1D cannot take a zero-width input (it views to (-1, 0)): an empty MLP becomes a stub
        ffn = FFNSpec(layer, "mlp", [layer.mlp.c_fc], layer.mlp.c_proj)
    return LayerSpec(name, "gpt2", layer, spec, ffn, [layer.ln_1, layer.ln_2], _stubs(att, layer.mlp))


def _vit(layer: nn.Module, name: str) -> LayerSpec:
    att, spec = layer.attention, None
    if not is_stub(att):
        def set_heads(module, h, g):
            module.num_attention_heads = h

        spec = AttentionSpec(layer, "attention", Rows(att.q_proj), Rows(att.k_proj), Rows(att.v_proj), att.o_proj,
                             att.num_attention_heads, att.num_attention_heads, att.head_dim, set_heads=set_heads)
    ffn = FFNSpec(None, None, [layer.mlp.fc1], layer.mlp.fc2)
    return LayerSpec(name, "vit", layer, spec, ffn, [layer.layernorm_before, layer.layernorm_after], _stubs(att))


def _llama(layer: nn.Module, name: str) -> LayerSpec:
    att, spec = layer.self_attn, None
    if not is_stub(att):
        dim = att.head_dim
        heads, kv_heads = out_features(att.q_proj) // dim, out_features(att.k_proj) // dim

        def set_heads(module, h, g):
            module.num_key_value_groups = h // g

        spec = AttentionSpec(layer, "self_attn", Rows(att.q_proj), Rows(att.k_proj), Rows(att.v_proj), att.o_proj,
                             heads, kv_heads, dim, set_heads=set_heads)
    mlp = layer.mlp
    ffn = FFNSpec(None, None, [mlp.gate_proj, mlp.up_proj], mlp.down_proj)
    return LayerSpec(name, "llama", layer, spec, ffn, [layer.input_layernorm, layer.post_attention_layernorm],
                     _stubs(att))


def _mha_spec(owner: nn.Module | None, attr: str, mha: nn.Module) -> AttentionSpec | None:
    if is_stub(mha):
        return None
    if is_pruned_attention(mha):
        return AttentionSpec(owner, attr, Rows(mha.q_proj), Rows(mha.k_proj), Rows(mha.v_proj), mha.out_proj,
                             mha.num_heads, mha.num_heads, mha.head_dim, functional_out=True, first_arg="query")
    return AttentionSpec(owner, attr, None, None, None, mha.out_proj, mha.num_heads, mha.num_heads,
                         mha.head_dim, fused=True, functional_out=True, first_arg="query")


def _encoder_layer(layer: nn.Module, name: str) -> LayerSpec:
    # the fused fast path takes linear2.bias as a tensor: it cannot be None
    ffn = FFNSpec(None, None, [layer.linear1], layer.linear2, bias_removable=False)
    return LayerSpec(name, "transformer_encoder_layer", layer, _mha_spec(layer, "self_attn", layer.self_attn), ffn,
                     [layer.norm1, layer.norm2], _stubs(layer.self_attn))


def _has(module: nn.Module, *paths: str) -> bool:
    for path in paths:
        target = module
        for part in path.split("."):
            target = getattr(target, part, None)
            if target is None:
                return False
    return True


def _adapter(module: nn.Module) -> Callable[[nn.Module, str], LayerSpec] | None:
    """The adapter that understands ``module`` as a transformer layer, or None.

    Matched by the parts that survive ``finalize`` (an emptied attention or GPT-2 MLP becomes a
    stub), so a pruned model is still understood.
    """
    if isinstance(module, nn.TransformerEncoderLayer):
        return _encoder_layer
    if _has(module, "attention", "intermediate.dense", "output.dense", "output.LayerNorm"):
        return _bert
    if _has(module, "attention", "ffn.lin1", "ffn.lin2", "sa_layer_norm", "output_layer_norm"):
        return _distilbert
    if _has(module, "attn", "mlp", "ln_1", "ln_2"):
        return _gpt2
    if _has(module, "attention", "mlp.fc1", "mlp.fc2", "layernorm_before", "layernorm_after"):
        return _vit
    if _has(module, "self_attn", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
        return _llama
    return None


def find_layers(model: nn.Module) -> list[LayerSpec]:
    """Every transformer layer of a supported architecture in ``model``, in model order.

    A bare ``nn.MultiheadAttention`` (not inside a ``TransformerEncoderLayer``) becomes a layer
    with attention only. Returns ``[]`` when nothing is recognised (callers raise).
    """
    layers: list[LayerSpec] = []
    taken: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in taken:
            continue
        adapter = _adapter(module)
        if adapter is not None:
            layers.append(adapter(module, name))
            taken.update(id(m) for m in module.modules())
        elif is_mha(module) or _is_removed_mha(module):
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name) if name else None  # None: the model itself
            layers.append(LayerSpec(name, "multihead_attention", module, _mha_spec(owner, attr, module), None, [],
                                    _stubs(module)))
            taken.add(id(module))
    return layers

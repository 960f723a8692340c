"""What an unpruned model *is*, as JSON-ready data from which it can be built again (no pickle).

* A Hugging Face model of a class ``transformers`` exports: ``{"library": "transformers",
  "class": "BertForSequenceClassification", "attn_implementation": "sdpa"}``; its sizes are
  in its config (``config.json`` beside the weights).
* ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder``
  (exactly these classes): ``{"library": "torch", "class": "TransformerEncoder", "args":
  {...}}``, the constructor arguments (an encoder's ``args["encoder_layer"]`` holds its
  layer's). Accepted only when a module built from them matches the model (same ``repr``,
  parameter names and shapes, activation function).
* Any other class whose layers learnmask finds: ``{"library": "custom", "class":
  "package.module.Class"}``; it is never imported from the record: whoever loads it passes an
  unpruned instance.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}
TORCH_CLASSES = {"MultiheadAttention": nn.MultiheadAttention, "TransformerEncoderLayer": nn.TransformerEncoderLayer,
                 "TransformerEncoder": nn.TransformerEncoder}
SUPPORTED = ("Hugging Face models of a class that transformers exports (BERT, RoBERTa, DistilBERT, GPT-2, ViT, "
             "Llama and their task heads)", "nn.TransformerEncoder", "nn.TransformerEncoderLayer",
             "nn.MultiheadAttention")


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _first_difference(expected: dict, found: dict) -> str:
    for name in sorted(set(expected) | set(found)):
        if expected.get(name) != found.get(name):
            return f"{name}: {found.get(name, 'absent')} here, {expected.get(name, 'absent')} when built"
    return "none"


def _mha_args(module: nn.MultiheadAttention) -> dict:
    return dict(embed_dim=module.embed_dim, num_heads=module.num_heads, dropout=module.dropout,
                bias=module.in_proj_bias is not None, add_bias_kv=module.bias_k is not None,
                add_zero_attn=module.add_zero_attn, kdim=module.kdim, vdim=module.vdim, batch_first=module.batch_first)


def _activation(layer: nn.TransformerEncoderLayer) -> str | None:
    return next((name for name, function in _ACTIVATIONS.items() if layer.activation is function), None)


def _layer_args(layer: nn.TransformerEncoderLayer) -> dict:
    return dict(d_model=layer.self_attn.embed_dim, nhead=layer.self_attn.num_heads,
                dim_feedforward=layer.linear1.out_features, dropout=layer.dropout.p, activation=_activation(layer),
                layer_norm_eps=layer.norm1.eps, batch_first=layer.self_attn.batch_first, norm_first=layer.norm_first,
                bias=layer.linear1.bias is not None)


def _torch_args(model: nn.Module) -> dict:
    if type(model) is nn.MultiheadAttention:
        return _mha_args(model)
    if type(model) is nn.TransformerEncoderLayer:
        return _layer_args(model)
    norm = model.norm
    if norm is not None and type(norm) is not nn.LayerNorm:
        raise ValueError(f"its final norm is a {type(norm).__name__}, not an nn.LayerNorm")
    return dict(encoder_layer=_layer_args(model.layers[0]), num_layers=len(model.layers),
                norm=None if norm is None else dict(normalized_shape=list(norm.normalized_shape), eps=norm.eps,
                                                    elementwise_affine=norm.elementwise_affine,
                                                    bias=norm.bias is not None),
                enable_nested_tensor=model.enable_nested_tensor, mask_check=model.mask_check)


def build_torch(name: str, args: dict) -> nn.Module:
    """An ``nn.MultiheadAttention``/``TransformerEncoderLayer``/``TransformerEncoder`` from its
    recorded constructor ``args`` (on the current default device, in eval mode).

    Raises:
        ValueError: an unknown class, activation or argument (the message names it).
    """
    if name not in TORCH_CLASSES:
        raise ValueError(f"torch class {name!r} is not one learnmask rebuilds; expected one of {sorted(TORCH_CLASSES)}")
    args = copy.deepcopy(args)
    try:
        if name == "TransformerEncoder":
            layer = _build_layer(args.pop("encoder_layer"))
            norm = args.pop("norm")
            norm = None if norm is None else nn.LayerNorm(**norm)
            module = nn.TransformerEncoder(layer, norm=norm, **args)
        elif name == "TransformerEncoderLayer":
            module = _build_layer(args)
        else:
            module = nn.MultiheadAttention(**args)
    except (TypeError, KeyError) as error:
        raise ValueError(f"cannot build nn.{name} from {args}: {error}") from error
    return module.eval()


def _build_layer(args: dict) -> nn.TransformerEncoderLayer:
    if args.get("activation") not in _ACTIVATIONS:
        raise ValueError(f"activation {args.get('activation')!r} is not one learnmask rebuilds; expected one of "
                         f"{sorted(_ACTIVATIONS)}")
    return nn.TransformerEncoderLayer(**args)


def _describe_torch(model: nn.Module) -> dict | str:
    name = type(model).__name__
    layers = [model] if name == "TransformerEncoderLayer" else list(getattr(model, "layers", []))
    for layer in layers:
        if _activation(layer) is None:
            return (f"its nn.TransformerEncoderLayer has the activation {layer.activation!r}; learnmask rebuilds "
                    f"{sorted(_ACTIVATIONS)} only")
    try:
        args = _torch_args(model)
        with torch.device("meta"):
            built = build_torch(name, args)
    except ValueError as error:
        return str(error)
    if repr(built) != repr(model) or _shapes(built) != _shapes(model) or any(
            _activation(a) != _activation(b) for a, b in zip(layers, getattr(built, "layers", [built]))):
        return (f"an nn.{name} built from its constructor arguments {args} differs from it (first difference: "
                f"{_first_difference(_shapes(built), _shapes(model))}); were its modules changed after construction?")
    return {"library": "torch", "class": name, "args": args}


def _describe_transformers(model: nn.Module) -> dict | str:
    import transformers

    name = type(model).__name__
    if getattr(transformers, name, None) is not type(model):
        return f"{name} is not a class that transformers exports"
    with torch.device("meta"):
        built = type(model)(copy.deepcopy(model.config))
    if _shapes(built) != _shapes(model):
        return (f"its parameters differ from a {name} built from its config (first difference: "
                f"{_first_difference(_shapes(built), _shapes(model))})")
    return {"library": "transformers", "class": name,
            "attn_implementation": getattr(model.config, "_attn_implementation", None)}


def describe(model: nn.Module) -> dict | str:
    """The architecture of an unpruned ``model`` as JSON-ready data, or why it cannot be rebuilt.

    Returns:
        a dict (see the module docstring), or a string saying why ``model`` cannot be rebuilt
        from data (``save_pruned`` raises with it).
    """
    cls = type(model)
    if cls in TORCH_CLASSES.values():
        return _describe_torch(model)
    if cls.__module__.startswith("transformers.") and hasattr(model, "config"):
        return _describe_transformers(model)
    return {"library": "custom", "class": f"{cls.__module__}.{cls.__qualname__}"}

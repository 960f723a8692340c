"""Save a finalized (pruned) model as safetensors + JSON and load it back, with no pickle.

A pruned model's layers may differ in size, which no Hugging Face config can state. A folder
written by :func:`save_pruned` holds:

* ``model.safetensors`` — the weights (a tensor shared by two names, as tied embeddings, once);
* ``pruning.json`` — what the model kept of the original, layer by layer, and how to build the
  original (see :mod:`learnmask.export.schema`);
* Hugging Face models: ``original_config.json``, the unpruned model's config; and, where the
  config can state the pruned sizes (every layer kept the same number of heads, key/value heads
  and FFN units, no block emptied, and the config's head size formula still holds),
  ``config.json`` with those sizes, so ``AutoModel.from_pretrained(folder)`` loads it without
  learnmask. Without ``config.json`` Hugging Face refuses the folder rather than loading a model
  with emptied blocks re-initialised.

:func:`load_pruned` builds the original architecture (``original_config.json`` or recorded
constructor arguments), runs finalize's own pruning on it with the recorded units
(:func:`learnmask.export.finalize.prune`), then loads the weights with every name and shape
checked. Eval outputs are bit-identical to the saved model's.
"""
from __future__ import annotations

import copy
import json
import os
import pathlib
import re

import torch
from torch import Tensor, nn

from learnmask.export import architecture, record, schema
from learnmask.export.finalize import prune
from learnmask.inject.architectures import find_layers
from learnmask.io import atomic_write_bytes, atomic_write_text

WEIGHTS_FILE = "model.safetensors"
ORIGINAL_CONFIG_FILE = "original_config.json"
CONFIG_FILE = "config.json"
# LayerSpec.arch -> config keys of (hidden size, attention heads, FFN units)
_CONFIG_KEYS = {"bert": ("hidden_size", "num_attention_heads", "intermediate_size"),
                "vit": ("hidden_size", "num_attention_heads", "intermediate_size"),
                "llama": ("hidden_size", "num_attention_heads", "intermediate_size"),
                "distilbert": ("dim", "n_heads", "hidden_dim"),
                "gpt2": ("n_embd", "n_head", "n_inner")}


def _record_to_save(model: nn.Module) -> dict:
    rec = record.record_of(model)
    name = type(model).__name__
    supported = "; ".join(architecture.SUPPORTED)
    if rec is None:
        raise ValueError(f"{name} carries no record of what was pruned: save_pruned saves the model that "
                         f"learnmask.export.finalize (or load_pruned) returns. Supported: {supported}")
    if "unsupported" in rec:
        raise ValueError(f"save_pruned cannot save this {name}: {rec['unsupported']}. Supported: {supported}")
    if any("learnmask" in key or ".parametrizations." in key for key in model.state_dict()):
        raise ValueError(f"{name} carries learnmask gates; finalize it (or remove the gates) before saving")
    found = find_layers(model)
    if [layer.name for layer in found] != [entry["name"] for entry in rec["layers"]]:
        raise ValueError(f"{name}'s layers {[layer.name for layer in found]} are not the ones finalize recorded "
                         f"{[entry['name'] for entry in rec['layers']]}; was the model changed after finalize?")
    for entry, layer in zip(rec["layers"], found):
        for key, spec, size in (("attention", layer.attention, lambda s: s.num_heads),
                                ("ffn", layer.ffn, lambda s: s.units)):
            kept = entry[key]["kept"] if entry[key] is not None else None
            if spec is not None and (kept is None or size(spec) != len(kept)):
                raise ValueError(f"{layer.name}'s {key} has {size(spec)} units but finalize recorded "
                                 f"{None if kept is None else len(kept)}; was the model changed after finalize?")
    return rec


def _tensors(model: nn.Module) -> dict[str, Tensor]:
    """The state dict with each shared tensor (tied weights) once, under its first name."""
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = _storage_key(tensor)
        if key is not None and key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.detach().cpu().contiguous()
    return tensors


def _storage_key(tensor: Tensor):
    if tensor.numel() == 0:
        return None
    return tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride()


def _dtype(model: nn.Module) -> str | None:
    dtypes = {str(t.dtype).removeprefix("torch.") for t in model.state_dict().values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 and dtypes <= set(schema.DTYPES) else None


def _plain_config(model: nn.Module, rec: dict):
    """A copy of ``model.config`` stating the pruned sizes, or None where no config can."""
    layers = rec["layers"]
    found = find_layers(model)
    if not layers or not found or found[0].arch not in _CONFIG_KEYS:
        return None
    if any(entry["attention"] is None or entry["ffn"] is None or not entry["attention"]["kept"] for entry in layers):
        return None
    heads = {len(entry["attention"]["kept"]) for entry in layers}
    units = {len(entry["ffn"]["kept"]) for entry in layers}
    if len(heads) != 1 or len(units) != 1:
        return None
    config = copy.deepcopy(model.config)
    hidden_key, heads_key, units_key = _CONFIG_KEYS[found[0].arch]
    if found[0].arch == "llama":
        original_heads, groups = config.num_attention_heads, config.num_key_value_heads
        config.head_dim = getattr(config, "head_dim", None) or config.hidden_size // original_heads
        group = original_heads // groups
        kept_groups = {len({h // group for h in entry["attention"]["kept"]}) for entry in layers}
        if len(kept_groups) != 1:
            return None
        config.num_key_value_heads = kept_groups.pop()
    setattr(config, heads_key, heads.pop())
    setattr(config, units_key, units.pop())
    if rec["hidden"]["kept"] is not None:
        setattr(config, hidden_key, len(rec["hidden"]["kept"]))
    try:
        with torch.device("meta"):
            built = type(model)(copy.deepcopy(config))
    except Exception:  # the config rejects these sizes (say, hidden not a multiple of heads)
        return None
    shapes = {name: tuple(t.shape) for name, t in built.state_dict().items()}
    return config if shapes == {name: tuple(t.shape) for name, t in model.state_dict().items()} else None


def _config_json(config, class_name: str) -> str:
    config = copy.deepcopy(config)
    config.architectures = [class_name]
    return config.to_json_string()


def _dumps(data: dict) -> str:
    """Indented JSON with each list of indices on one line."""
    text = json.dumps(data, indent=1)
    return re.sub(r"\[[\d,\s]*\]", lambda match: json.dumps(json.loads(match.group(0))), text) + "\n"


def save_pruned(model: nn.Module, folder: str | os.PathLike) -> pathlib.Path:
    """Save a model returned by :func:`~learnmask.export.finalize` so that :func:`load_pruned`
    rebuilds it exactly: safetensors weights, ``pruning.json`` and the config (see the module
    docstring). No pickle is written.

    Args:
        model: the finalized model (Hugging Face BERT, RoBERTa, DistilBERT, GPT-2, ViT, Llama
            and their task heads; ``nn.TransformerEncoder``/``TransformerEncoderLayer``;
            ``nn.MultiheadAttention``; or a model of your own class whose layers learnmask
            finds, loaded back with ``load_pruned(folder, model=YourClass(...))``).
        folder: created if missing; it must be empty or hold an earlier ``save_pruned``, whose
            files are replaced.

    Returns:
        The folder.

    Raises:
        ValueError: ``model`` was not finalized by learnmask (no record), was pruned through
            ``target_modules``, still carries gates, or changed its layers after finalize.
        FileExistsError: ``folder`` holds other files.
    """
    rec = _record_to_save(model)
    folder = pathlib.Path(folder)
    if folder.exists() and any(folder.iterdir()) and not (folder / schema.RECORD_FILE).is_file():
        raise FileExistsError(f"{folder} holds files of something else; save_pruned writes into an empty folder "
                              "or over an earlier save_pruned")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / schema.RECORD_FILE).unlink(missing_ok=True)  # a half-written folder is no saved model
    (folder / CONFIG_FILE).unlink(missing_ok=True)
    from safetensors.torch import save

    plain = None
    if rec["architecture"]["library"] == "transformers":
        plain = _plain_config(model, rec)
        atomic_write_text(folder / ORIGINAL_CONFIG_FILE, _config_json(model.config, type(model).__name__))
    atomic_write_bytes(folder / WEIGHTS_FILE, save(_tensors(model), metadata={"format": "pt"}))
    if plain is not None:
        atomic_write_text(folder / CONFIG_FILE, _config_json(plain, type(model).__name__))
    data = {"format": schema.FORMAT, "version": schema.VERSION, "architecture": rec["architecture"],
            "dtype": _dtype(model), "loads_with_transformers": plain is not None, "hidden": rec["hidden"],
            "layers": rec["layers"]}
    atomic_write_text(folder / schema.RECORD_FILE, _dumps(data))
    return folder


def _original(folder: pathlib.Path, arch: dict, model: nn.Module | None) -> nn.Module:
    """The unpruned model to prune again: ``model`` (checked) or one built from the record."""
    library, name = arch["library"], arch["class"]
    if model is not None:
        cls = type(model)
        found = {"custom": f"{cls.__module__}.{cls.__qualname__}"}.get(library, cls.__name__)
        if found != name:
            raise ValueError(f"{folder} holds a pruned {name}; model= is a {found}")
        return model
    if library == "custom":
        raise ValueError(f"{folder} holds a pruned {name}, a class learnmask does not build from data; pass "
                         f"load_pruned(folder, model=...) an unpruned {name.rpartition('.')[2]} "
                         "built as before pruning")
    if library == "torch":
        return architecture.build_torch(name, arch["args"])
    import transformers

    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"{folder / schema.RECORD_FILE} names {name!r}, which is not a model class of transformers "
                         f"{transformers.__version__}")
    path = folder / ORIGINAL_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the folder is incomplete (save the model again)")
    try:
        config = cls.config_class.from_json_file(str(path))
    except (ValueError, OSError) as error:
        raise ValueError(f"{path} is not a valid {cls.config_class.__name__} ({error})") from error
    kwargs = {"attn_implementation": arch["attn_implementation"]} if arch["attn_implementation"] else {}
    return cls._from_config(config, **kwargs)


def _check_layers(model: nn.Module, rec: dict, path: pathlib.Path) -> list:
    layers = find_layers(model)
    names = [layer.name for layer in layers]
    if names != [entry["name"] for entry in rec["layers"]]:
        raise ValueError(f"{path} records the layers {[e['name'] for e in rec['layers']]}, but the rebuilt "
                         f"{type(model).__name__} has {names}")
    for entry, layer in zip(rec["layers"], layers):
        for key, spec, count, size in (("attention", layer.attention, "heads", lambda s: s.num_heads),
                                       ("ffn", layer.ffn, "units", lambda s: s.units)):
            recorded = entry[key]
            if (spec is None) != (recorded is None) or (spec is not None and size(spec) != recorded[count]):
                raise ValueError(f"{path}: {layer.name}'s {key} has {None if spec is None else size(spec)} units in "
                                 f"the rebuilt model, {None if recorded is None else recorded[count]} in the record")
    if layers and rec["hidden"]["size"] != layers[0].hidden_size:
        raise ValueError(f"{path}: hidden size {rec['hidden']['size']} recorded, {layers[0].hidden_size} rebuilt")
    return layers


def _read_weights(path: pathlib.Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the folder is incomplete (save the model again)")
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # safetensors raises its own error type for a damaged header
        raise ValueError(f"{path} is not a readable safetensors file ({error}); save the model again") from error


def _load_weights(model: nn.Module, path: pathlib.Path) -> None:
    """Copy the weights of ``path`` into ``model`` after checking every name, shape and alias."""
    stored = _read_weights(path)
    expected = model.state_dict()
    full, missing, wrong = {}, [], []
    groups: dict = {}
    for name, tensor in expected.items():
        groups.setdefault(_storage_key(tensor) or name, []).append(name)
    for names in groups.values():
        present = [name for name in names if name in stored]
        if not present:
            missing += names
            continue
        for name in names:
            full[name] = stored[present[0]]
    unexpected = sorted(set(stored) - set(expected))
    for name, tensor in full.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            wrong.append(f"{name} {tuple(tensor.shape)} (rebuilt: {tuple(expected[name].shape)})")
    if missing or unexpected or wrong:
        raise ValueError(f"{path} does not hold the weights of the model {schema.RECORD_FILE} describes: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}, other shape {wrong[:5]}"
                         + (" (and more)" if max(len(missing), len(unexpected), len(wrong)) > 5 else ""))
    for name, tensor in full.items():
        if expected[name].dtype != tensor.dtype:
            _set_dtype(model, name, tensor.dtype)
    model.load_state_dict(full, strict=True)


def _set_dtype(model: nn.Module, name: str, dtype: torch.dtype) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if attr in owner._parameters:
        owner._parameters[attr].data = owner._parameters[attr].data.to(dtype)
    else:
        owner._buffers[attr] = owner._buffers[attr].to(dtype)


def load_pruned(folder: str | os.PathLike, *, model: nn.Module | None = None) -> nn.Module:
    """A model saved by :func:`save_pruned`, rebuilt and loaded without pickle, in eval mode.

    Args:
        folder: what :func:`save_pruned` wrote.
        model: an unpruned instance of the saved class, built as before pruning; needed only
            for a class of your own (else built from the folder). It is pruned in place.

    Returns:
        The pruned model (same classes as the saved one, on the CPU), whose eval outputs are
        bit-identical to the saved model's. It carries the record again, so it can be gated,
        finalized and saved again.

    Raises:
        FileNotFoundError: ``folder`` is not a saved pruned model (no ``pruning.json``) or a
            file of it is missing.
        ValueError: ``pruning.json`` of another version or malformed, weights that do not
            match the rebuilt model, or a custom class without ``model=`` (each names the file).
    """
    folder = pathlib.Path(folder)
    rec = schema.read(folder)
    path = folder / schema.RECORD_FILE
    original = _original(folder, rec["architecture"], model)
    if rec["dtype"] is not None:
        original.to(getattr(torch, rec["dtype"]))
    layers = _check_layers(original, rec, path)
    pruned, _ = prune(original, layers, record.replay_masks(rec))
    _load_weights(pruned, folder / WEIGHTS_FILE)
    record.attach(pruned, {key: rec[key] for key in ("architecture", "hidden", "layers")})
    return pruned.eval()


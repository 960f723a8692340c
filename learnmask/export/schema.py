"""``pruning.json``, the record :func:`~learnmask.export.save_pruned` writes beside the weights:
its format, version and checks. Reading it never imports or runs anything it names.

Version 1::

    {"format": "learnmask.pruned_model", "version": 1,
     "architecture": {"library": "transformers", "class": "BertForSequenceClassification",
                      "attn_implementation": "sdpa"},
     "dtype": "float32",                       # of every floating tensor; null when they differ
     "loads_with_transformers": false,         # config.json written: AutoModel loads the folder
     "hidden": {"size": 32, "kept": null},
     "layers": [{"name": "bert.encoder.layer.0",
                 "attention": {"heads": 4, "kept": [], "bias": true},
                 "ffn": {"units": 64, "kept": [0, 3, 5], "bias": true}}, ...]}

(``hidden``/``layers``: see :mod:`learnmask.export.record`; ``architecture``: see
:mod:`learnmask.export.architecture`.)
"""
from __future__ import annotations

import json
import pathlib

FORMAT = "learnmask.pruned_model"
VERSION = 1
RECORD_FILE = "pruning.json"
DTYPES = ("float32", "float64", "float16", "bfloat16")
_LIBRARIES = {"transformers": {"library", "class", "attn_implementation"}, "torch": {"library", "class", "args"},
              "custom": {"library", "class"}}


class _Checker:
    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def fail(self, where: str, what: str) -> None:
        raise ValueError(f"{self.path}: {where} {what}; the file is damaged or was not written by "
                         "learnmask.export.save_pruned (save the model again)")

    def keys(self, value, keys: set[str], where: str) -> dict:
        if not isinstance(value, dict):
            self.fail(where, f"is a {type(value).__name__}, not an object")
        if set(value) != keys:
            missing, unknown = sorted(keys - set(value)), sorted(set(value) - keys)
            self.fail(where, f"has missing keys {missing} / unknown keys {unknown}")
        return value

    def of(self, value, kind, where: str):
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.fail(where, f"is {value!r}, expected {getattr(kind, '__name__', kind)}")
        return value

    def indices(self, value, total: int, where: str) -> None:
        self.of(value, list, where)
        if any(not isinstance(i, int) or isinstance(i, bool) for i in value) or \
                any(not 0 <= i < total for i in value) or any(a >= b for a, b in zip(value, value[1:])):
            self.fail(where, f"must be increasing indices in [0, {total}); got {value}")

    def units(self, value, count: str, where: str) -> None:
        if value is None:
            return
        self.keys(value, {count, "kept", "bias"}, where)
        total = self.of(value[count], int, f"{where}.{count}")
        self.indices(value["kept"], total, f"{where}.kept")
        self.of(value["bias"], bool, f"{where}.bias")
        if value["kept"] and not value["bias"]:
            self.fail(where, "keeps units but not its output bias")


def check(data, path: pathlib.Path) -> dict:
    """``data`` (parsed ``path``) if it is a version-1 record; else a ValueError naming ``path``."""
    c = _Checker(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        c.fail("the top level", f"has format {data.get('format') if isinstance(data, dict) else data!r}, "
                                f"expected {FORMAT!r}")
    if data.get("version") != VERSION:
        raise ValueError(f"{path}: format version {data.get('version')!r}; this learnmask reads version {VERSION} "
                         "(save the model again with this learnmask, or load it with the learnmask that saved it)")
    c.keys(data, {"format", "version", "architecture", "dtype", "loads_with_transformers", "hidden", "layers"},
           "the top level")
    arch = data["architecture"]
    library = c.of(arch, dict, "architecture").get("library")
    if library not in _LIBRARIES:
        c.fail("architecture.library", f"is {library!r}, expected one of {sorted(_LIBRARIES)}")
    c.keys(arch, _LIBRARIES[library], "architecture")
    c.of(arch["class"], str, "architecture.class")
    if library == "torch":
        c.of(arch["args"], dict, "architecture.args")
    if data["dtype"] is not None and data["dtype"] not in DTYPES:
        c.fail("dtype", f"is {data['dtype']!r}, expected null or one of {list(DTYPES)}")
    c.of(data["loads_with_transformers"], bool, "loads_with_transformers")
    hidden = c.keys(data["hidden"], {"size", "kept"}, "hidden")
    if hidden["size"] is not None:
        c.of(hidden["size"], int, "hidden.size")
    if hidden["kept"] is not None:
        c.indices(hidden["kept"], hidden["size"] or 0, "hidden.kept")
        if not hidden["kept"]:
            c.fail("hidden.kept", "is empty (a model keeps at least one hidden dimension)")
    for number, layer in enumerate(c.of(data["layers"], list, "layers")):
        where = f"layers[{number}]"
        c.keys(layer, {"name", "attention", "ffn"}, where)
        c.of(layer["name"], str, f"{where}.name")
        c.units(layer["attention"], "heads", f"{where}.attention")
        c.units(layer["ffn"], "units", f"{where}.ffn")
    return data


def read(folder: pathlib.Path) -> dict:
    """The checked record of a saved pruned model in ``folder``.

    Raises:
        FileNotFoundError: no ``folder``, or no ``pruning.json`` in it (not a saved pruned model).
        ValueError: ``pruning.json`` is not JSON, of another format or version, or malformed.
    """
    path = folder / RECORD_FILE
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; load_pruned reads a folder written by save_pruned")
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a pruned model saved by learnmask.export.save_pruned: it has no "
                                f"{RECORD_FILE} (a folder of save_pretrained loads with from_pretrained instead)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); save the model again") from error
    return check(data, path)

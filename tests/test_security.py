"""Nothing learnmask reads back runs code: every file it reads (run checkpoints, the dense-weights
cache, the MLM head cache, a saved pruned model, results JSONL) replaced by a crafted pickle whose
unpickling would create a marker file is refused, and the marker never appears."""
import json
import os
import pathlib
import pickle
import re

import pytest
import torch
from test_finalize import gated
from test_mlm_recipe import tiny_model_path  # noqa: F401 (a fixture)

from learnmask.export import finalize, load_pruned, save_pruned
from learnmask.io import DamagedFileError, UnsafeFileError, load_torch_file, read_jsonl


class _Payload:
    """Unpickling this calls ``pathlib.Path.touch(marker)``: code run by merely loading a file."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


class _ShellPayload:
    """Unpickling this runs a shell command (``os.system``, a global in a module torch's
    weights-only unpickler blocks outright, with its own wording)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _crafted(path: pathlib.Path, marker: pathlib.Path, kind: str) -> None:
    """A file at ``path`` that runs code when unpickled: torch's zip format (calling a function,
    or a shell command) or a raw pickle."""
    payload = _ShellPayload(marker) if kind == "torch-shell" else _Payload(marker)
    content = {"key": "x", "step": 1, "model": {}, "head": {}, "metrics": {}, "payload": payload}
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind.startswith("torch"):
        torch.save(content, path)
    else:
        path.write_bytes(pickle.dumps(content, protocol=4))


KINDS = ["torch", "torch-shell", "raw"]


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "marker"
    yield path
    assert not path.exists(), "a crafted file ran code"


@pytest.mark.parametrize("kind", KINDS)
def test_the_crafted_files_do_run_code_when_unpickled(kind, tmp_path):
    """The payload is real: an unsafe load creates the marker (so the other tests have teeth)."""
    marker = tmp_path / "ran"
    _crafted(tmp_path / "evil.pt", marker, kind)
    try:  # a raw pickle runs its payload while torch reads it as the legacy format's magic number
        torch.load(tmp_path / "evil.pt", weights_only=False)
    except RuntimeError:
        assert kind == "raw"
    assert marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_load_torch_file_refuses_a_crafted_file(kind, tmp_path, marker):
    _crafted(tmp_path / "evil.pt", marker, kind)
    refusal = "loading it would run code" if kind.startswith("torch") else "a raw pickle stream, not a torch file"
    with pytest.raises(UnsafeFileError, match=rf"checkpoint .*evil.pt was refused: .*{refusal}.*Delete it to restart"):
        load_torch_file(tmp_path / "evil.pt")


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", "not torch\n".encode()])
def test_empty_truncated_and_garbage_files_are_a_value_error_naming_the_file(content, tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"run checkpoint .*checkpoint.pt cannot be read: it is empty, truncated "
                                         r"or not a torch file .*Delete it to restart"):
        load_torch_file(path, what="run checkpoint")


def test_a_truncated_real_checkpoint_is_a_damaged_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {"w": torch.ones(1000)}, "rng": torch.get_rng_state(), "history": ([0.1], [0.2])}, path)
    assert load_torch_file(path)["history"] == ([0.1], [0.2])  # what the recipes save loads
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DamagedFileError, match="checkpoint.pt cannot be read"):
        load_torch_file(path)


# -- every place learnmask reads a file back ------------------------------------------------------

@pytest.fixture
def tiny_classifier(tiny):  # conftest's tiny BERT and toy task in place of the real ones
    from test_recipe_train import config

    return config(epochs=1, test_size=16, method="importance", target_sparsity=0.5)


@pytest.mark.parametrize("kind", KINDS)
def test_a_crafted_run_checkpoint_is_refused(kind, tiny_classifier, tmp_path, marker):
    from learnmask.recipe import train

    _crafted(tmp_path / "run" / "checkpoint.pt", marker, kind)
    with pytest.raises(ValueError, match=r"run checkpoint .*checkpoint.pt"):
        train.fit(train.dense_twin(tiny_classifier), tmp_path / "run", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("kind", KINDS)
def test_a_crafted_dense_weights_cache_is_refused(kind, tiny_classifier, tmp_path, marker):
    from learnmask.recipe import train

    dense = train.dense_twin(tiny_classifier)
    _crafted(tmp_path / "cache" / f"dense-{dense.key()}.pt", marker, kind)
    with pytest.raises(ValueError, match=r"dense-weights cache .*dense-.*\.pt"):
        train.fit(tiny_classifier, tmp_path / "run", cache_dir=tmp_path / "cache")  # importance reads the cache


@pytest.fixture
def tiny_mlm(tiny_model_path):  # noqa: F811 (the imported fixture)
    from test_mlm_recipe import tiny

    return tiny(tiny_model_path)


@pytest.mark.parametrize("kind", KINDS)
def test_a_crafted_mlm_head_cache_and_mlm_checkpoint_are_refused(kind, tiny_mlm, tmp_path, marker):
    from learnmask.recipe import mlm

    head = tmp_path / "cache" / f"mlm-head-{tiny_mlm.head_key()}.pt"
    _crafted(head, marker, kind)
    with pytest.raises(ValueError, match=r"MLM head cache .*mlm-head-"):
        mlm.fit_mlm(tiny_mlm, tmp_path / "run", cache_dir=tmp_path / "cache")
    head.unlink()  # a good head is warmed and cached; then the run's checkpoint is read
    _crafted(tmp_path / "run" / "checkpoint.pt", marker, kind)
    with pytest.raises(ValueError, match=r"run checkpoint .*checkpoint.pt"):
        mlm.fit_mlm(tiny_mlm, tmp_path / "run", cache_dir=tmp_path / "cache")
    assert head.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_a_crafted_pruned_model_folder_is_refused(kind, tmp_path, marker):
    folder = tmp_path / "pruned"
    save_pruned(finalize(gated("bert")[1]), folder)
    _crafted(folder / "model.safetensors", marker, kind)
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file"):
        load_pruned(folder)
    _crafted(folder / "pruning.json", marker, kind)
    with pytest.raises(ValueError, match=r"pruning.json is not valid JSON"):
        load_pruned(folder)


@pytest.mark.parametrize("architecture", [
    {"library": "transformers", "class": "os.system", "attn_implementation": None},
    {"library": "transformers", "class": "AutoConfig", "attn_implementation": None},
    {"library": "torch", "class": "Linear", "args": {}},
    {"library": "custom", "class": "os.system"}])
def test_a_pruned_model_record_cannot_name_code_to_run(architecture, tmp_path):
    """The record names a class; learnmask only looks it up among transformers' model classes or
    the three torch classes it rebuilds, and imports nothing else."""
    folder = tmp_path / "pruned"
    save_pruned(finalize(gated("encoder_layer")[1]), folder)
    data = json.loads((folder / "pruning.json").read_text())
    (folder / "pruning.json").write_text(json.dumps({**data, "architecture": architecture}))
    with pytest.raises(ValueError, match=re.escape(repr(architecture["class"]) if architecture["library"] != "custom"
                                                   else architecture["class"])):
        load_pruned(folder)


@pytest.mark.parametrize("kind", KINDS)
def test_a_crafted_results_file_is_refused(kind, tmp_path, marker):
    _crafted(tmp_path / "results.jsonl", marker, kind)
    with pytest.raises(ValueError, match=r"results.jsonl( is not UTF-8 text|:1 is not valid JSON)"):
        read_jsonl(tmp_path / "results.jsonl")


def test_no_unsafe_load_anywhere_in_learnmask():
    """Every torch file is read through io.load_torch_file; nothing unpickles."""
    root = pathlib.Path(__file__).parents[1] / "learnmask"
    offenders = []
    for path in root.rglob("*.py"):
        text = path.read_text()
        for pattern in (r"weights_only\s*=\s*False", r"\bpickle\.(load|loads|Unpickler)\b", r"\bdill\b",
                        r"torch\.load\("):
            if re.search(pattern, text) and not (path.name == "io.py" and pattern == r"torch\.load\("):
                offenders.append(f"{path.relative_to(root)}: {pattern}")
    assert not offenders, offenders

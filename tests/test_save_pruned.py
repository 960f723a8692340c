"""save_pruned / load_pruned: a finalized model saved as safetensors + JSON comes back with
bit-identical eval outputs, for every supported architecture, with heads, FFN units, hidden
dimensions and whole blocks removed, and nothing is unpickled on the way."""
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
import zoo
from test_finalize import gated
from torch import nn

from learnmask.export import finalize, load_pruned, save_pruned
from learnmask.gates import FixedGate
from learnmask.inject import apply_masks


def _no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("load_pruned unpickled something")

    for owner, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(owner, name, refuse)


def _round_trip(plain, folder, monkeypatch, **kwargs):
    save_pruned(plain, folder)
    with monkeypatch.context() as patch:
        _no_unpickling(patch)
        return load_pruned(folder, **kwargs)


def _same_structure(a: nn.Module, b: nn.Module) -> None:
    modules_a = [(n, type(m).__name__) for n, m in a.named_modules()]
    assert modules_a == [(n, type(m).__name__) for n, m in b.named_modules()]
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("closed", [True, False])
@pytest.mark.parametrize("name", zoo.ARCHS)
def test_round_trip_is_bit_identical(name, closed, tmp_path, monkeypatch):
    model, handle = gated(name, closed=closed)  # heads, FFN units, hidden dims, blocks (closed) removed
    plain, batch = finalize(handle), zoo.inputs(name)
    custom = {"model": zoo.make(name)} if name == "multihead_attention" else {}  # MHAStack: a class of the tests'
    loaded = _round_trip(plain, tmp_path, monkeypatch, **custom)
    assert not loaded.training
    assert torch.equal(zoo.run(name, loaded, batch), zoo.run(name, plain, batch))
    _same_structure(loaded, plain)
    files = sorted(p.name for p in tmp_path.iterdir())
    hf = name not in ("encoder_layer", "multihead_attention")
    assert files == (["model.safetensors", "original_config.json", "pruning.json"] if hf else
                     ["model.safetensors", "pruning.json"])


def test_removed_blocks_and_pruned_multihead_attention_round_trip(tmp_path, monkeypatch):
    model = zoo.make("encoder_layer")
    heads = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    ffn = torch.ones(2, 64)
    ffn[1, ::3] = 0
    handle = apply_masks(model, heads=True, ffn=True, ffn_blocks=True, gates={
        "heads": FixedGate(heads), "ffn": FixedGate(ffn), "ffn_blocks": FixedGate(torch.tensor([0.0, 1.0]))})
    plain, batch = finalize(handle), zoo.inputs("encoder_layer")
    first, second = plain.layers
    assert type(first.self_attn).__name__ == "RemovedAttention"
    assert type(second.self_attn).__name__ == "PrunedMultiheadAttention" and second.self_attn.num_heads == 2
    assert first.linear1.out_features == 0
    loaded = _round_trip(plain, tmp_path, monkeypatch)
    assert type(loaded.layers[0].self_attn).__name__ == "RemovedAttention"
    assert type(loaded.layers[1].self_attn).__name__ == "PrunedMultiheadAttention"
    assert torch.equal(zoo.run("encoder_layer", loaded, batch), zoo.run("encoder_layer", plain, batch))
    _same_structure(loaded, plain)


@pytest.mark.parametrize("keep", [[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
def test_bare_multihead_attention_round_trips(keep, tmp_path, monkeypatch):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True, add_bias_kv=True, kdim=12, vdim=10).eval()
    handle = apply_masks(mha, heads=True, gates={"heads": FixedGate(torch.tensor([keep]))})
    plain = finalize(handle)
    q, k, v = torch.randn(2, 5, 16), torch.randn(2, 7, 12), torch.randn(2, 7, 10)
    loaded = _round_trip(plain, tmp_path, monkeypatch)
    assert type(loaded).__name__ == type(plain).__name__
    with torch.no_grad():
        expected, got = plain(q, k, v), loaded(q, k, v)
    assert torch.equal(got[0], expected[0])
    assert (got[1] is None and expected[1] is None) or torch.equal(got[1], expected[1])
    assert json.loads((tmp_path / "pruning.json").read_text())["architecture"] == {
        "library": "torch", "class": "MultiheadAttention",
        "args": dict(embed_dim=16, num_heads=4, dropout=0.0, bias=True, add_bias_kv=True, add_zero_attn=False,
                     kdim=12, vdim=10, batch_first=True)}


def test_single_encoder_layer_with_gelu_and_norm_first(tmp_path, monkeypatch):
    layer = nn.TransformerEncoderLayer(32, 4, 48, dropout=0.0, activation="gelu", norm_first=True,
                                       batch_first=True).eval()
    handle = apply_masks(layer, heads=True, ffn=True, gates={
        "heads": FixedGate(torch.tensor([[1.0, 0.0, 0.0, 1.0]])),
        "ffn": FixedGate((torch.arange(48) % 2).float()[None]),
    })
    plain, x = finalize(handle), torch.randn(2, 5, 32)
    loaded = _round_trip(plain, tmp_path, monkeypatch)
    with torch.no_grad():
        assert torch.equal(loaded(x), plain(x))


def test_gqa_padding_and_a_model_finalized_twice_round_trip(tmp_path, monkeypatch):
    model = zoo.make("llama")
    heads = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]])  # group (2, 3) padded with head 2
    once = finalize(apply_masks(model, heads=True, gates={"heads": FixedGate(heads)}))
    ffn = torch.ones(2, 64)
    ffn[:, 5:40] = 0
    again = finalize(apply_masks(once, heads=False, ffn=True, hidden=True, gates={
        "ffn": FixedGate(ffn), "hidden": FixedGate((torch.arange(32) % 3 != 0).float())}))
    entries = again.learnmask_pruning["layers"]
    assert [e["attention"]["kept"] for e in entries] == [[0], [0, 1, 2, 3]]
    assert entries[0]["ffn"]["kept"] == list(range(5)) + list(range(40, 64))
    batch = zoo.inputs("llama")
    loaded = _round_trip(again, tmp_path, monkeypatch)
    assert torch.equal(zoo.run("llama", loaded, batch), zoo.run("llama", again, batch))
    _same_structure(loaded, again)


def test_a_loaded_model_saves_and_loads_again(tmp_path, monkeypatch):
    model, handle = gated("gpt2")
    plain, batch = finalize(handle), zoo.inputs("gpt2")
    loaded = _round_trip(plain, tmp_path / "a", monkeypatch)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # tied, stored once
    again = _round_trip(loaded, tmp_path / "b", monkeypatch)
    assert torch.equal(zoo.run("gpt2", again, batch), zoo.run("gpt2", plain, batch))
    assert (tmp_path / "a" / "pruning.json").read_text() == (tmp_path / "b" / "pruning.json").read_text()


def test_float64_model_round_trips(tmp_path, monkeypatch):
    model, handle = gated("llama")
    plain = finalize(handle).to(torch.float64)
    batch = zoo.inputs("llama")
    loaded = _round_trip(plain, tmp_path, monkeypatch)
    assert json.loads((tmp_path / "pruning.json").read_text())["dtype"] == "float64"
    assert next(loaded.parameters()).dtype == torch.float64
    assert torch.equal(zoo.run("llama", loaded, batch), zoo.run("llama", plain, batch))


# -- plain Hugging Face loading where every layer kept equal sizes ------------------------------

def _equal_sizes(name: str):
    """(model, finalized) with every layer keeping the same number of heads/units/dims."""
    model = zoo.make(name)
    units = 128 if name == "gpt2" else 64
    ffn = torch.ones(2, units)
    ffn[:, 7:30] = 0
    heads = FixedGate(torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]]))
    if name == "bert":  # its pooler keeps the hidden width and its head size is hidden / heads: FFN only
        gates = {"ffn": FixedGate(ffn)}
    elif name == "gpt2":  # head size n_embd / n_head: halve both
        gates = {"heads": heads, "ffn": FixedGate(ffn), "hidden": FixedGate((torch.arange(32) % 2 == 0).float())}
    else:  # llama: any head count (its config has head_dim)
        gates = {"heads": heads, "ffn": FixedGate(ffn), "hidden": FixedGate((torch.arange(32) % 4 != 1).float())}
    flags = {key: key in gates for key in ("heads", "ffn", "hidden")}
    return model, finalize(apply_masks(model, **flags, gates=gates))


def test_equal_sizes_load_with_transformers_alone(tmp_path):
    """BERT (FFN units), GPT-2 and Llama (heads, FFN units, hidden dims) load with from_pretrained
    in a process where learnmask cannot be imported, with bit-identical outputs."""
    cases = {}
    for name in ("bert", "gpt2", "llama"):
        model, plain = _equal_sizes(name)
        save_pruned(plain, tmp_path / name)
        assert json.loads((tmp_path / name / "pruning.json").read_text())["loads_with_transformers"]
        batch = zoo.inputs(name)
        torch.save({"batch": batch, "logits": zoo.run(name, plain, batch),
                    "hidden": plain.base_model(**batch).last_hidden_state.detach()}, tmp_path / name / "expected.pt")
        cases[name] = type(plain).__name__
    code = f"""
import sys
sys.modules["learnmask"] = None  # any import of learnmask now fails
import torch, transformers
torch.set_num_threads({torch.get_num_threads()})  # the same summation order as this process
for name, cls in {cases!r}.items():
    folder = {str(tmp_path)!r} + "/" + name
    expected = torch.load(folder + "/expected.pt")
    task = getattr(transformers, cls).from_pretrained(folder).eval()
    base = transformers.AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        assert torch.equal(task(**expected["batch"]).logits, expected["logits"]), name
        assert torch.equal(base(**expected["batch"]).last_hidden_state, expected["hidden"]), name
print("ok")
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_unequal_layers_write_no_config_json(tmp_path):
    model, handle = gated("bert")
    save_pruned(finalize(handle), tmp_path)  # layer 0's attention emptied: no config can say that
    assert not (tmp_path / "config.json").exists()
    assert not json.loads((tmp_path / "pruning.json").read_text())["loads_with_transformers"]
    model, plain = _equal_sizes("bert")
    save_pruned(plain, tmp_path)  # over the earlier save: config.json appears
    assert (tmp_path / "config.json").exists()
    save_pruned(finalize(gated("bert")[1]), tmp_path)  # and goes again
    assert not (tmp_path / "config.json").exists()


# -- errors ---------------------------------------------------------------------------------------

@pytest.fixture
def saved_bert(tmp_path):
    model, handle = gated("bert")
    save_pruned(finalize(handle), tmp_path / "bert")
    return tmp_path / "bert"


def _edit(folder, change):
    path = folder / "pruning.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_a_folder_that_is_not_a_saved_pruned_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_pruned(tmp_path / "absent")
    zoo.make("bert").save_pretrained(tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match=r"hf is not a pruned model saved by .*no pruning.json"):
        load_pruned(tmp_path / "hf")


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(version=2), r"pruning.json: format version 2; this learnmask reads version 1"),
    (lambda d: d.update(format="something"), r"pruning.json: the top level has format 'something'"),
    (lambda d: d.update(extra=1), r"pruning.json: the top level has missing keys \[\] / unknown keys \['extra'\]"),
    (lambda d: d["layers"][1]["attention"].update(kept=[3, 1]), r"layers\[1\].attention.kept must be increasing"),
    (lambda d: d["layers"][1]["ffn"].update(kept=[64]),
     r"layers\[1\].ffn.kept must be increasing indices in \[0, 64\)"),
    (lambda d: d["layers"][0].update(name="bert.encoder.layer.9"), r"records the layers \['bert.encoder.layer.9'"),
    (lambda d: d["layers"][0]["ffn"].update(units=65), r"layer.0's ffn has 64 units in the rebuilt model, 65"),
    (lambda d: d["architecture"].update({"class": "AutoConfig"}), r"names 'AutoConfig', which is not a model class"),
    (lambda d: d["architecture"].update(library="pickle"), r"architecture.library is 'pickle'"),
])
def test_a_damaged_or_foreign_record_is_a_clear_error(saved_bert, change, message):
    _edit(saved_bert, change)
    with pytest.raises(ValueError, match=message) as error:
        load_pruned(saved_bert)
    assert "pruning.json" in str(error.value) or "bert" in str(error.value)


def test_json_that_is_not_json(saved_bert):
    (saved_bert / "pruning.json").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match=r"pruning.json is not valid JSON"):
        load_pruned(saved_bert)


def test_weights_that_do_not_match(saved_bert, tmp_path):
    other = tmp_path / "other"
    save_pruned(finalize(gated("bert", seed=3)[1]), other)  # other units kept
    (saved_bert / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"model.safetensors does not hold the weights of the model pruning.json"):
        load_pruned(saved_bert)
    data = (saved_bert / "model.safetensors").read_bytes()
    (saved_bert / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file"):
        load_pruned(saved_bert)
    (saved_bert / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model.safetensors is missing"):
        load_pruned(saved_bert)


def test_a_class_of_your_own_needs_an_instance(tmp_path):
    model, handle = gated("multihead_attention")  # zoo.MHAStack
    save_pruned(finalize(handle), tmp_path)
    with pytest.raises(ValueError, match=r"holds a pruned zoo.MHAStack, a class learnmask does not build .*model="):
        load_pruned(tmp_path)
    with pytest.raises(ValueError, match=r"holds a pruned zoo.MHAStack; model= is a torch.nn.modules"):
        load_pruned(tmp_path, model=nn.MultiheadAttention(32, 4))


def test_what_save_pruned_refuses(tmp_path):
    with pytest.raises(ValueError, match=r"BertForSequenceClassification carries no record of what was pruned.*"
                                         r"Supported: Hugging Face"):
        save_pruned(zoo.make("bert"), tmp_path / "a")
    import test_finalize_custom as custom

    model = custom._model()
    handle = apply_masks(model, heads=True, ffn=True, **custom.NAMES)
    with pytest.raises(ValueError, match=r"cannot save this Sequential: it was pruned through target_modules"):
        save_pruned(finalize(handle), tmp_path / "b")
    plain = _equal_sizes("bert")[1]
    apply_masks(plain, heads=False, ffn=True)
    with pytest.raises(ValueError, match=r"carries learnmask gates; finalize it"):
        save_pruned(plain, tmp_path / "c")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"d holds files of something else"):
        save_pruned(finalize(gated("bert")[1]), tmp_path / "d")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["notes.txt"]


def test_a_torch_module_that_its_constructor_arguments_do_not_describe(tmp_path):
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation=torch.tanh, batch_first=True).eval()
    plain = finalize(apply_masks(layer, heads=True, gates={"heads": FixedGate(torch.tensor([[1.0, 0.0, 1.0, 1.0]]))}))
    with pytest.raises(ValueError, match=r"activation .*tanh.*learnmask rebuilds \['gelu', 'relu'\] only"):
        save_pruned(plain, tmp_path)
    encoder = zoo.make("encoder_layer")
    encoder.layers[1].linear2 = nn.Linear(64, 32, bias=False)  # changed after construction
    plain = finalize(apply_masks(encoder, heads=True))
    with pytest.raises(ValueError, match=r"differs from it \(first difference: layers.1.linear2.bias"):
        save_pruned(plain, tmp_path)


def test_a_model_changed_after_finalize_is_refused(tmp_path):
    plain = finalize(gated("distilbert", closed=False)[1])
    del plain.distilbert.transformer.layer[1]
    with pytest.raises(ValueError, match=r"are not the ones finalize recorded .*changed after finalize"):
        save_pruned(plain, tmp_path)
    plain = finalize(gated("vit", closed=False)[1])
    plain.vit.layers[0].mlp.fc2 = nn.Linear(3, 32)
    with pytest.raises(ValueError, match=r"vit.layers.0.s ffn has 3 units but finalize recorded"):
        save_pruned(plain, tmp_path)


def test_views_of_one_storage_are_saved_apart(tmp_path, monkeypatch):
    model, handle = gated("encoder_layer", closed=False)
    plain = finalize(handle)
    with torch.no_grad():  # two parameters that are views of one storage (as a user's model may hold)
        both = torch.cat([plain.layers[0].norm1.weight, plain.layers[0].norm2.weight])
        plain.layers[0].norm1.weight = nn.Parameter(both[:32])
        plain.layers[0].norm2.weight = nn.Parameter(both[32:])
    loaded = _round_trip(plain, tmp_path, monkeypatch)
    batch = zoo.inputs("encoder_layer")
    assert torch.equal(zoo.run("encoder_layer", loaded, batch), zoo.run("encoder_layer", plain, batch))

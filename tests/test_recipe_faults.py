"""Faults of the loop, the runner and the tables (issue 12), each as its kind: files read back
run no code; a result is counted once and trained once; a finished result is never lost; clear
messages instead of tracebacks; settings that cannot work are refused; smoke runs leave the paper
alone."""
import errno
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_recipe_train import config

from learnmask import io
from learnmask.cli import main
from learnmask.recipe import train as recipe
from learnmask.recipe.config import RunConfig
from learnmask.recipe.results import read_results

ROOT = pathlib.Path(__file__).parents[1]
GRID = """
name = "g"
title = "T ({test_size} held out)"
seeds = [0]
[defaults]
epochs = 1
batch_size = 16
freeze = []
lr = 1e-3
test_size = 64
[[rows]]
label = "dense"
method = "dense"
[[rows]]
label = "hc"
method = "hard_concrete"
target_sparsity = [0.5]
"""


def grid_file(tmp_path, text=GRID):
    path = tmp_path / "g.toml"
    path.write_text(text)
    return path


# -- 1. loading a file can run code: tests/test_security.py (every file the recipes read back,
# crafted to run code, is refused and runs nothing) -------------------------------------------------

# -- 2. a result counted twice; a cell trained twice -------------------------------------------

def record(key, accuracy=0.9, seed=0):
    return {"key": key, "grid": "heads", "row": "dense", "metrics": {"accuracy": accuracy, "realized_sparsity": 0.0,
            "parameters": 1e6, "parameters_dense": 1e6},
            "config": {"target_sparsity": 0.0, "seed": seed, "epochs": 2, "importance_epochs": 1, "method": "dense"}}


def test_a_repeated_record_counts_once_with_a_warning_and_a_conflicting_one_is_an_error(tmp_path, caplog):
    path = tmp_path / "r.jsonl"
    key = RunConfig(method="dense").key()
    line = json.dumps(record(key)) + "\n"
    path.write_text(line + line)
    with caplog.at_level(logging.WARNING):
        assert len(read_results(path)) == 1
    assert f"{path}:2 repeats the record of line 1 (run {key}); counted once" in caplog.text
    grid = grid_file(tmp_path, 'name = "heads"\ntitle = "T"\n[[rows]]\nlabel = "dense"\nmethod = "dense"\n')
    args = ["table", "heads", "--grid-file", str(grid), "--results", str(path), "--tables-dir", str(tmp_path / "t")]
    assert main(args) == 0
    assert "| dense | 0% | 90.0 | n/a | 1 |" in (tmp_path / "t" / "heads.md").read_text()  # one seed, not two
    path.write_text(line + json.dumps(record(key, accuracy=0.1)) + "\n")
    with pytest.raises(ValueError, match=rf"r.jsonl:1 and .*r.jsonl:2 both record run {key} but differ "
                                         r"\(metrics.accuracy\); keep the right one"):
        read_results(path)
    assert main(args) == 2


FAKE_RECIPE = '''
import os, pathlib, time
from learnmask.recipe import registry

registry.register_recipe(registry.Recipe("fake", "learnmask.recipe.config:RunConfig", "fake_recipe:fit",
                                         "learnmask.recipe.table:write_tables",
                                         "learnmask.recipe.figures:plot_trajectories"))


def fit(cfg, run_dir, *, cache_dir, progress=None, record=None):
    with open(os.environ["FAKE_LOG"], "a") as log:
        log.write(f"{cfg.key()} {os.getpid()}\\n")
    hang = os.environ.get("FAKE_HANG")
    if hang and not os.path.exists(hang):
        pathlib.Path(hang).touch()
        time.sleep(600)  # killed here, holding its claim
    time.sleep(0.4)
    metrics = {"accuracy": 0.5, "realized_sparsity": cfg.target_sparsity, "parameters": 1, "parameters_dense": 1}
    record(metrics)
    return metrics
'''
DRIVER = '''
import pathlib, sys, time
import fake_recipe  # registers the recipe before the grid names it
from learnmask.recipe.grid import load_grid
from learnmask.recipe.runner import run_grid

grid, work, go = (pathlib.Path(a) for a in sys.argv[1:4])
(work.parent / f"ready-{sys.argv[4]}").touch()
while not go.exists():
    time.sleep(0.02)
run_grid(load_grid(grid), results_path=work / "results.jsonl", work_dir=work, show_progress=False)
'''
FAKE_GRID = 'name = "g"\nrecipe = "fake"\nseeds = [0, 1, 2]\n[[rows]]\nlabel = "d"\nmethod = "dense"\n' \
            '[[rows]]\nlabel = "hc"\nmethod = "hard_concrete"\ntarget_sparsity = [0.5, 0.9]\n'


def start_driver(tmp_path, name, **env):
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
                   "FAKE_LOG": str(tmp_path / "trained.log"), **env}
    command = [sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "g.toml"), str(tmp_path / "work"),
               str(tmp_path / f"go-{name}"), name]
    return subprocess.Popen(command, env=environment, cwd=tmp_path)


def wait_for(path, process, seconds=120):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, f"driver exited with {process.returncode}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def trained(tmp_path):
    return [line.split() for line in (tmp_path / "trained.log").read_text().splitlines()]


@pytest.fixture
def fake_grid(tmp_path):
    (tmp_path / "fake_recipe.py").write_text(FAKE_RECIPE)
    (tmp_path / "driver.py").write_text(DRIVER)
    grid_file(tmp_path, FAKE_GRID)
    return tmp_path


def test_two_processes_on_one_grid_train_every_cell_once(fake_grid):
    tmp_path = fake_grid
    drivers = [start_driver(tmp_path, name) for name in ("a", "b")]
    for name, driver in zip("ab", drivers):
        wait_for(tmp_path / f"ready-{name}", driver)
    (tmp_path / "go-a").touch()
    (tmp_path / "go-b").touch()
    assert [driver.wait(timeout=120) for driver in drivers] == [0, 0]
    keys = [key for key, _ in trained(tmp_path)]
    assert len(keys) == 9 and len(set(keys)) == 9  # every cell trained exactly once
    assert len({pid for _, pid in trained(tmp_path)}) == 2  # and both processes did train
    records = read_results(tmp_path / "work" / "results.jsonl")
    assert sorted(r["key"] for r in records) == sorted(keys)


def test_a_killed_process_leaves_no_claim_behind(fake_grid):
    tmp_path = fake_grid
    hang = tmp_path / "hanging"
    first = start_driver(tmp_path, "a", FAKE_HANG=str(hang))
    wait_for(tmp_path / "ready-a", first)
    (tmp_path / "go-a").touch()
    wait_for(hang, first)  # it holds the first cell's claim and trains it
    second = start_driver(tmp_path, "b")
    wait_for(tmp_path / "ready-b", second)
    (tmp_path / "go-b").touch()
    assert second.wait(timeout=120) == 0  # it left the claimed cell alone
    claimed = trained(tmp_path)[0][0]
    assert [key for key, _ in trained(tmp_path)].count(claimed) == 1 and len(trained(tmp_path)) == 9
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    third = start_driver(tmp_path, "c")
    wait_for(tmp_path / "ready-c", third)
    (tmp_path / "go-c").touch()
    assert third.wait(timeout=120) == 0
    assert [key for key, _ in trained(tmp_path)][9:] == [claimed]  # the dead process's claim was taken over
    assert len(read_results(tmp_path / "work" / "results.jsonl")) == 9


# -- 3. a finished result lost -------------------------------------------------------------------

def read_only(folder, monkeypatch):
    """Make ``folder`` unwritable: by its mode, or (as root, whom modes do not stop) by refusing
    to create files in it."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o500)
        return
    import tempfile

    make = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and folder.resolve() in (pathlib.Path(dir).resolve(), *pathlib.Path(dir).resolve().parents):
            raise PermissionError(errno.EACCES, "Permission denied", str(folder))
        return make(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)


def test_an_unwritable_results_folder_is_said_before_anything_trains(tiny, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(recipe, "fit", lambda *a, **k: calls.append(a))
    read_only(tmp_path / "ro", monkeypatch)
    args = ["reproduce", "--grid-file", str(grid_file(tmp_path)), "--work-dir", str(tmp_path / "w"),
            "--results", str(tmp_path / "ro" / "results.jsonl"), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"cannot write results to {tmp_path / 'ro' / 'results.jsonl'}: Permission denied; nothing was trained" in err
    assert calls == [] and len(err.strip().splitlines()) == 1
    config_file = tmp_path / "c.toml"
    config_file.write_text('method = "dense"\n')
    read_only(tmp_path / "out", monkeypatch)
    assert main(["run", str(config_file), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "cannot write the run's metrics" in capsys.readouterr().err and calls == []


def test_a_full_disk_keeps_the_checkpoint_and_the_rerun_records_without_training(tiny, tmp_path, monkeypatch, capsys,
                                                                                   caplog):
    from learnmask.recipe import results

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(results, "append_jsonl", full)
    args = ["reproduce", "--grid-file", str(grid_file(tmp_path)), "--work-dir", str(tmp_path / "w"),
            "--tables-dir", str(tmp_path / "t"), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "checkpoint stays in" in err
    dense = RunConfig.from_dict({"method": "dense", "epochs": 1, "batch_size": 16, "freeze": [], "lr": 1e-3,
                                 "test_size": 64})
    assert (tmp_path / "w" / f"run-{dense.key()}" / "checkpoint.pt").exists()
    monkeypatch.undo()
    monkeypatch.setattr(recipe, "_load", tiny_load)
    with caplog.at_level(logging.INFO, logger="learnmask.recipe.loop"):
        assert main(args) == 0
    assert f"resumed {tmp_path / 'w' / f'run-{dense.key()}'} at step 6" in caplog.text  # the last step: no training
    assert len(read_results(tmp_path / "w" / "results.jsonl")) == 2
    assert not (tmp_path / "w" / f"run-{dense.key()}" / "checkpoint.pt").exists()


def tiny_load(cfg):
    from conftest import synthetic, tiny_bert

    torch.manual_seed(cfg.seed)
    return tiny_bert(num_labels=2, layers=2, heads=4), synthetic(96, 0), synthetic(64, 1), 0


def test_a_killed_checkpoint_write_leaves_no_temporary_file_on_the_next_run(tiny, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    script = ("import os, signal, pathlib\nfrom learnmask.io import _atomic_replace\n"
              "def write(handle):\n"
              "    handle.write(b'x' * 1000000); handle.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
              f"_atomic_replace(pathlib.Path({str(run / 'checkpoint.pt')!r}), write)\n")
    killed = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL
    assert len(list(run.glob(".checkpoint.pt.*.tmp"))) == 1  # what a killed write leaves
    recipe.fit(config(method="dense", epochs=1), run, cache_dir=tmp_path / "cache")
    assert list(run.glob(".*.tmp")) == []


def test_temporaries_of_a_live_writer_are_left_alone(tmp_path):
    mine = tmp_path / f".r.jsonl.{os.getppid()}.abc.tmp"  # the parent process is alive
    mine.write_text("x")
    io.atomic_write_text(tmp_path / "r.jsonl", "y")
    assert mine.exists() and (tmp_path / "r.jsonl").read_text() == "y"


# -- 4. raw tracebacks where a message belongs ---------------------------------------------------

@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", b"garbage, not a torch file"])
def test_a_broken_checkpoint_names_the_file_and_says_it_can_be_deleted(tiny, tmp_path, content, capsys):
    cfg = config(method="dense", epochs=1)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(content)
    with pytest.raises(ValueError, match=rf"run checkpoint {tmp_path / 'run' / 'checkpoint.pt'} cannot be read: it is "
                                         r"empty, truncated or not a torch file .* Delete it to restart"):
        recipe.fit(cfg, tmp_path / "run", cache_dir=tmp_path / "cache")


def test_a_checkpoint_of_another_kind_is_a_clear_error(tiny, tmp_path):
    cfg = config(method="dense", epochs=1)
    (tmp_path / "run").mkdir()
    torch.save({"step": 3, "model": {}}, tmp_path / "run" / "checkpoint.pt")  # an older learnmask's, say
    with pytest.raises(ValueError, match="is not a checkpoint this version of learnmask wrote; delete it to restart"):
        recipe.fit(cfg, tmp_path / "run", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("line, message", [
    ('{"grid": "heads", "row": "dense"}', r"r.jsonl:1 is not a learnmask result: 'key' is missing"),
    ('{"key": 3, "grid": "heads", "row": "x", "config": {}, "metrics": {}}', "'key' is a int, expected a str"),
])
def test_a_results_line_of_the_wrong_schema_is_a_clear_error(tmp_path, capsys, line, message):
    (tmp_path / "r.jsonl").write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        read_results(tmp_path / "r.jsonl")
    assert main(["table", "heads", "--results", str(tmp_path / "r.jsonl"), "--tables-dir", str(tmp_path)]) == 2
    assert "fix or remove that line" in capsys.readouterr().err


def test_a_folder_passed_as_results_is_a_clear_error(tmp_path, capsys):
    assert main(["table", "heads", "--results", str(tmp_path), "--tables-dir", str(tmp_path / "t")]) == 2
    assert f"{tmp_path} is a folder; expected a JSON-lines file" in capsys.readouterr().err
    args = ["reproduce", "heads", "--results", str(tmp_path), "--work-dir", str(tmp_path / "w"), "--no-progress"]
    assert main(args) == 2
    assert f"results file {tmp_path} is a folder" in capsys.readouterr().err


def test_max_length_above_the_models_positions_is_refused_when_the_run_starts(tiny, tmp_path, monkeypatch):
    steps = []
    monkeypatch.setattr(recipe.ClassifyTask, "loss", lambda *a: steps.append(a))
    with pytest.raises(ValueError, match="max_length is 100, but BertForSequenceClassification has 64 positions; "
                                         "set max_length <= 64"):
        recipe.fit(config(method="dense", max_length=100), tmp_path / "run", cache_dir=tmp_path / "cache")
    assert steps == []


# -- 5. settings that cannot work -------------------------------------------------------------------

@pytest.mark.parametrize("values", [{"lr": float("inf")}, {"controller_kp": float("nan")}, {"l0_weight": float("inf")},
                                    {"warmup_ratio": float("nan")}, {"gate_init_log_alpha": float("-inf")}])
def test_non_finite_settings_are_refused(values):
    name = next(iter(values))
    with pytest.raises(ValueError, match=rf"{name} must be a finite number; got (inf|nan|-inf) \(in cfg\)"):
        RunConfig.from_dict(values, where="cfg")


def test_non_finite_mlm_settings_are_refused():
    from learnmask.recipe.mlm_config import MLMRunConfig

    with pytest.raises(ValueError, match="head_lr must be a finite number; got inf"):
        MLMRunConfig.from_dict({"head_lr": float("inf")})


def test_non_finite_values_from_the_command_line_are_refused(tmp_path, capsys):
    config_file = tmp_path / "c.toml"
    config_file.write_text('method = "dense"\n')
    assert main(["run", str(config_file), "--set", "lr=inf", "--out", str(tmp_path)]) == 2
    assert "lr must be a finite number; got inf" in capsys.readouterr().err


# -- 11. smoke runs overwrite the paper ---------------------------------------------------------------

def test_tables_of_overridden_runs_go_elsewhere_and_titles_state_the_real_numbers(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    grid = grid_file(tmp_path)
    keys = {}

    def fake_fit(cfg, run_dir, *, cache_dir, progress=None, record=None):
        keys[cfg.key()] = cfg
        metrics = {"accuracy": 0.5, "realized_sparsity": cfg.target_sparsity, "parameters": 1, "parameters_dense": 1,
                   "epochs": cfg.epochs}
        record(metrics)
        return metrics

    monkeypatch.setattr(recipe, "fit", fake_fit)
    assert main(["reproduce", "--grid-file", str(grid), "--no-progress"]) == 0
    assert "# T (64 held out)" in (tmp_path / "paper" / "tables" / "g.md").read_text()
    paper = (tmp_path / "paper" / "tables" / "g.md").read_bytes()
    smoke_args = ["reproduce", "--grid-file", str(grid), "--no-progress", "--set", "test_size=50", "--set", "epochs=2"]
    assert main(smoke_args) == 0
    assert (tmp_path / "paper" / "tables" / "g.md").read_bytes() == paper  # the paper's table is untouched
    smoke = tmp_path / "runs" / "g" / "tables" / "g@epochs=2,test_size=50.md"
    text = smoke.read_text()
    assert "# T (50 held out)" in text and "--set test_size=50 --set epochs=2" in text
    assert main(["table", "--grid-file", str(grid), "--set", "test_size=50", "--set", "epochs=2"]) == 0
    assert "# T (50 held out)" in smoke.read_text() and "`learnmask table --grid-file" in smoke.read_text()

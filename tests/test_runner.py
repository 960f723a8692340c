"""The grid runner: finished cells are never rerun or overwritten; shards split the grid."""
import pytest

from learnmask.io import read_jsonl
from learnmask.recipe import train
from learnmask.recipe.config import load_grid
from learnmask.recipe.runner import parse_shard, pending_cells, run_grid

GRID = """
name = "g"
seeds = [0, 1]
[[rows]]
label = "dense"
method = "dense"
[[rows]]
label = "hc"
method = "hard_concrete"
target_sparsity = [0.5, 0.9]
"""


@pytest.fixture
def grid(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text(GRID)
    return load_grid(path)


@pytest.fixture
def fake_fit(monkeypatch):
    calls = []

    def fit(cfg, run_dir, *, cache_dir, progress=None, record=None):
        calls.append(cfg.key())
        if len(calls) == 3 and fit.crash:
            raise KeyboardInterrupt
        metrics = {"accuracy": 0.5 + cfg.seed / 10, "realized_sparsity": cfg.target_sparsity}
        record(metrics)
        return metrics

    fit.crash = False
    monkeypatch.setattr(train, "fit", fit)
    return fit, calls


def test_finished_cells_are_never_rerun(grid, tmp_path, fake_fit):
    fit, calls = fake_fit
    results = tmp_path / "results.jsonl"
    fit.crash = True
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, results_path=results, work_dir=tmp_path, show_progress=False)
    assert len(read_jsonl(results)) == 2  # the two cells finished before the crash
    first_two = read_jsonl(results)
    fit.crash = False
    calls.clear()
    written = run_grid(grid, results_path=results, work_dir=tmp_path, show_progress=False)
    assert len(written) == 4 and len(calls) == 4
    records = read_jsonl(results)
    assert records[:2] == first_two  # not overwritten
    assert len({r["key"] for r in records}) == 6
    calls.clear()
    assert run_grid(grid, results_path=results, work_dir=tmp_path, show_progress=False) == []
    assert calls == []


def test_shards_partition_the_grid(grid, tmp_path):
    results = tmp_path / "none.jsonl"
    keys = [{c.key() for _, c in pending_cells(grid, results, shard=(i, 3))} for i in range(3)]
    assert sum(map(len, keys)) == 6 and len(set.union(*keys)) == 6


@pytest.mark.parametrize("text", ["1", "2/2", "a/b", "-1/2"])
def test_bad_shard_is_a_clear_error(text):
    with pytest.raises(ValueError, match="--shard"):
        parse_shard(text)
    assert parse_shard("1/4") == (1, 4)

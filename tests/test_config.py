"""Config validation: unknown keys, ranges, grid expansion."""
import dataclasses
import re

import pytest

from learnmask.recipe.config import RunConfig, load_grid

GRID = """
name = "g"
seeds = [0, 1]
full_seeds = [0, 1, 2]
[defaults]
epochs = 1
[[rows]]
label = "dense"
method = "dense"
[[rows]]
label = "hc"
method = "hard_concrete"
target_sparsity = [0.5, 0.9]
"""


def write(tmp_path, text):
    path = tmp_path / "grid.toml"
    path.write_text(text)
    return path


def test_grid_expands_rows_targets_seeds_in_order(tmp_path):
    grid = load_grid(write(tmp_path, GRID))
    cells = grid.cells()
    assert [(label, c.method, c.target_sparsity, c.seed) for label, c in cells] == [
        ("dense", "dense", 0.0, 0), ("dense", "dense", 0.0, 1),
        ("hc", "hard_concrete", 0.5, 0), ("hc", "hard_concrete", 0.5, 1),
        ("hc", "hard_concrete", 0.9, 0), ("hc", "hard_concrete", 0.9, 1),
    ]
    assert len(grid.cells(full=True)) == 9
    assert all(c.epochs == 1 for _, c in cells)
    assert len({c.key() for _, c in grid.cells(full=True)}) == 9


def test_key_changes_with_any_setting():
    base = RunConfig(method="topk", target_sparsity=0.5)
    assert base.key() == RunConfig(method="topk", target_sparsity=0.5).key()
    for change in ({"seed": 1}, {"lr": 3e-4}, {"freeze": ()}, {"target_sparsity": 0.6}):
        assert dataclasses.replace(base, **change).key() != base.key()


@pytest.mark.parametrize(
    "values, message",
    [
        ({"methd": "dense"}, r"unknown key\(s\) \['methd'\] in test; known keys: \[.*'method'"),
        ({"method": "hard_concrete", "target_sparsity": 1.0}, r"target_sparsity must be in \[0, 1\); got 1.0"),
        ({"method": "hard_concrete", "target_sparsity": -0.1}, r"target_sparsity must be in \[0, 1\); got -0.1"),
        ({"method": "dense", "target_sparsity": 0.5}, "method 'dense' has no gates"),
        ({"method": "random"}, "needs target_sparsity in \\(0, 1\\)"),
        ({"method": "magic", "target_sparsity": 0.5}, r"unknown method 'magic'; expected one of \["),
        ({"epochs": 0}, "epochs must be >= 1; got 0"),
        ({"gate_phase": 0.0}, r"gate_phase must be in \(0, 1\]; got 0.0"),
        ({"lr": -1.0}, "lr must be > 0; got -1.0"),
    ],
)
def test_bad_run_config_is_a_clear_error(values, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_dict(values, where="test")


def test_grid_errors_name_the_place(tmp_path):
    with pytest.raises(FileNotFoundError, match="grid file .* not found"):
        load_grid(tmp_path / "missing.toml")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['seed'\] at the top"):
        load_grid(write(tmp_path, "seed = 1\n" + GRID))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['epoch'\] in grid 'g', row 'dense'"):
        load_grid(write(tmp_path, GRID.replace("epochs = 1", "epoch = 1")))
    with pytest.raises(ValueError, match=r"target_sparsity must be in \[0, 1\); got 1.5"):
        load_grid(write(tmp_path, GRID.replace("[0.5, 0.9]", "[0.5, 1.5]")))
    with pytest.raises(ValueError, match="not valid TOML"):
        load_grid(write(tmp_path, GRID + "\n[[rows]\n"))
    goal = ('\n[[goals]]\ndescription = "x"\nrow = "hc"\ntarget = 0.9\n'
            'versus = "nope"\nversus_target = 0.0\nmin_difference = 1\n')
    with pytest.raises(ValueError, match="goal 1 names row 'nope'"):
        load_grid(write(tmp_path, GRID + goal))


def test_shipped_heads_grid_is_valid():
    from learnmask.recipe.registry import bundled_grid

    grid = load_grid(bundled_grid("heads"))
    cells = grid.cells()
    assert len(cells) == 9 and cells[0][1].method == "dense"
    assert sorted({c.target_sparsity for _, c in cells}) == [0.0, 0.5, 0.9]
    assert len(grid.cells(full=True)) == 27


@pytest.mark.parametrize(
    "values, message",
    [
        ({"epochs": "3"}, "epochs must be an integer; got str '3'"),
        ({"epochs": 1.5}, "epochs must be an integer; got float 1.5"),
        ({"method": "topk", "target_sparsity": "0.5"}, "target_sparsity must be a number; got str '0.5'"),
        ({"freeze": "word_embeddings"}, "freeze must be a list of strings; got str 'word_embeddings'"),
        ({"lr": True}, "lr must be a number; got bool True"),
    ],
)
def test_wrong_types_are_clear_errors_naming_the_place(values, message):
    with pytest.raises(ValueError, match=re.escape(message) + r" \(in cfg.toml\)"):
        RunConfig.from_dict(values, where="cfg.toml")
    assert RunConfig(lr=1).lr == 1.0 and isinstance(RunConfig(lr=1).lr, float)


def test_grid_structure_cannot_be_overridden(tmp_path):
    grid = load_grid(write(tmp_path, GRID))
    with pytest.raises(ValueError, match=r"\['seed'\] are set by the grid"):
        grid.cells(overrides={"seed": 3})
    with pytest.raises(ValueError, match=r"\['target_sparsity'\] are set by the grid"):
        grid.cells(overrides={"target_sparsity": 0.3})


@pytest.mark.parametrize("name", ["heads", "controllers", "mlm"])
def test_committed_results_keep_their_run_keys(name):
    """Every committed result's config still hashes to its recorded key, and the bundled grid still
    selects exactly those cells: nothing finished is orphaned by a new option."""
    import json
    import pathlib

    from learnmask.recipe.registry import bundled_grid

    root = pathlib.Path(__file__).parents[1]
    grid = load_grid(bundled_grid(name))
    records = [json.loads(line) for line in (root / "paper" / "results" / f"{name}.jsonl").read_text().splitlines()]
    config = grid.config_class()
    assert all(config.from_dict(r["config"]).key() == r["key"] for r in records)
    assert {cfg.key() for _, cfg in grid.cells(full=True)} <= {r["key"] for r in records}  # (older rows stay too)
    assert pathlib.Path(root / "experiments" / "grids" / f"{name}.toml").read_text() == bundled_grid(name).read_text()


def test_the_readme_mask_table_row_is_a_valid_grid_row(tmp_path):
    import pathlib

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    row = re.search(r"```toml\n(.*?)```", readme, re.S).group(1)
    grid = load_grid(write(tmp_path, 'name = "study"\n' + row))
    cells = grid.cells()
    assert [c.target_sparsity for _, c in cells] == [0.5, 0.9]
    spec = cells[0][1].mask_spec()
    assert spec.units == ("heads", "ffn") and spec.sparsity == "parameters" and spec.controller == "lagrangian"

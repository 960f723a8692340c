"""The interference tables and figure from synthetic records (no model, no data): intervals, paired
tests and goal checks against values computed by hand, the trade-off goal form of grid files, and
the files written."""
import math

import pytest

from learnmask.recipe.grid import GridConfig, GridRow, load_grid
from learnmask.recipe.interference_table import (
    check_trade_off,
    mcnemar_p,
    paired_test,
    plot_interference,
    summarize,
    ttest_p,
    write_interference_tables,
)
from learnmask.recipe.table import check_goals

GOAL = {"description": "masks keep A", "versus": "full fine-tuning", "gain_metric": "a_accuracy_head",
        "min_gain": 5.0, "loss_metric": "b_accuracy", "max_loss": 1.0}
ROWS = (GridRow("full fine-tuning", {"method": "full"}), GridRow("diff masks", {"method": "diff_masks"}),
        GridRow("head only", {"method": "head_only"}))


def grid(*goals):
    return GridConfig("interference", (0,), (0, 1, 2), {}, ROWS, goals=tuple(goals), recipe="classify")


def record(row, method, seed, *, b, a, probe, budget=1.0, changed=1.0, density=None, **lists):
    config = {"method": method, "budget": budget, "seed": seed, "b_train_examples": 2000, "b_test_examples": 0,
              "a_test_examples": 500, "b_epochs": 1, "a_epochs": 2}
    metrics = {"b_accuracy": b, "a_accuracy_before": 0.9, "a_accuracy_head": a, "a_probe_before": 0.92,
               "a_probe_after": probe, "fraction_changed": changed, "mask_density": density,
               "train_seconds": 1.0, "epochs": 1, **lists}
    return {"grid": "interference", "row": row, "config": config, "metrics": metrics}


def test_ci_half_width_of_three_seeds_is_student_t():
    records = [record("full fine-tuning", "full", seed, b=b, a=0.6, probe=0.8) for seed, b in enumerate((.8, .82, .84))]
    (full,) = summarize(grid(), records)
    # df = 2: the two-sided 95% quantile solves t / sqrt(t² + 2) = 0.95; sd of (80, 82, 84) is 2.
    t = math.sqrt(2 * 0.95**2 / (1 - 0.95**2))
    assert full.b_accuracy == pytest.approx(82.0)
    assert full.b_ci == pytest.approx(t * 2 / math.sqrt(3)) == pytest.approx(4.9683, abs=1e-4)
    assert full.a_head_ci == pytest.approx(0.0, abs=1e-9) and full.n == 3 and full.versus_full == {}


def test_exact_mcnemar_p_by_hand():
    # b = 8 (only the row right), c = 1 (only the reference right), 5 concordant:
    # p = 2 · P(X ≤ 1), X ~ Binomial(9, 1/2) = 2 · (1 + 9) / 512.
    row = [1] * 8 + [0] + [1, 1, 1, 0, 0]
    ref = [0] * 8 + [1] + [1, 1, 1, 0, 0]
    assert mcnemar_p(row, ref) == 20 / 512 == 0.0390625
    assert mcnemar_p(ref, row) == 0.0390625
    assert mcnemar_p([1, 0, 1], [1, 0, 1]) == 1.0  # no discordant pair
    with pytest.raises(ValueError, match="correctness lists of 3 and 2 examples"):
        mcnemar_p([1, 0, 1], [1, 0])


def test_paired_t_test_matches_the_closed_form_for_two_degrees_of_freedom():
    row, ref = [0.70, 0.75, 0.72], [0.60, 0.62, 0.66]  # differences 10, 13, 6 points
    t = (29 / 3) / math.sqrt((222 / 18) / 3)
    assert ttest_p(row, ref) == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-9)  # df = 2
    assert ttest_p(row, ref) == pytest.approx(0.0412896, abs=1e-6)
    assert ttest_p([0.7, 0.8], [0.7, 0.8]) == 1.0  # no difference at all: t = 0/0
    paired = paired_test({s: {"a_accuracy_head": v} for s, v in enumerate(row)},
                         {s: {"a_accuracy_head": v} for s, v in enumerate(ref)}, "a_accuracy_head")
    assert (paired.test, paired.seeds) == ("t", 3) and paired.delta == pytest.approx(29 / 3)
    assert paired_test({5: {"b_accuracy": 0.5}}, {0: {"b_accuracy": 0.4}}, "b_accuracy") is None  # no shared seed


def three_seeds(full_a=(0.60, 0.62, 0.66), mask_a=(0.70, 0.75, 0.72), mask_b=(0.84, 0.85, 0.83)):
    records = []
    for seed in range(3):
        records.append(record("full fine-tuning", "full", seed, b=0.85, a=full_a[seed], probe=0.80))
        records.append(record("diff masks", "diff_masks", seed, b=mask_b[seed], a=mask_a[seed], probe=0.84,
                              budget=0.05, changed=0.04, density=0.05))
    return records


def test_deltas_are_row_minus_full_with_their_signs_and_tests():
    full, mask = summarize(grid(), three_seeds())
    assert (full.row, mask.row, mask.budget, mask.method) == ("full fine-tuning", "diff masks", 0.05, "diff_masks")
    a, b, probe = (mask.versus_full[m] for m in ("a_accuracy_head", "b_accuracy", "a_probe_after"))
    assert a.delta == pytest.approx(29 / 3) and a.delta > 0 and a.test == "t"
    assert b.delta == pytest.approx(-1.0) and b.p == pytest.approx(1 - math.sqrt(3 / 5))  # t = -√3, df = 2
    assert probe.delta == pytest.approx(4.0) and probe.p == 0.0  # the same +4 in every seed: t = ∞
    assert mask.fraction_changed == pytest.approx(4.0) and mask.mask_density == pytest.approx(5.0)
    assert full.mask_density is None


def test_one_shared_seed_uses_mcnemar_on_the_examples():
    full = record("full fine-tuning", "full", 0, b=0.6, a=0.5, probe=0.5, b_correct=[0] * 8 + [1] + [1] * 5,
                  a_correct_head=[1, 0], a_probe_correct=[1, 1])
    mask = record("diff masks", "diff_masks", 0, b=0.9, a=0.5, probe=0.5, b_correct=[1] * 8 + [0] + [1] * 5,
                  a_correct_head=[1, 0], a_probe_correct=[0, 1], budget=0.005)
    _, summary = summarize(grid(), [full, mask])
    assert summary.versus_full["b_accuracy"].test == "McNemar"
    assert summary.versus_full["b_accuracy"].p == 0.0390625
    assert summary.versus_full["a_accuracy_head"].p == 1.0  # no discordant example
    assert summary.versus_full["a_probe_after"].p == 1.0  # b = 0, c = 1: binomtest(0, 1) = 1


def test_goal_met_names_the_row_and_probe_line_is_information_only():
    summaries = summarize(grid(GOAL), three_seeds(full_a=(0.60, 0.60, 0.60), mask_a=(0.75, 0.75, 0.75),
                                                  mask_b=(0.84, 0.84, 0.84)))
    main, probe = check_trade_off(GOAL, summaries)
    assert main.startswith("- masks keep A: met by diff masks (5%): task A (head kept) +15.0, task B -1.0 points")
    assert "rows whose method is full or head_only are not counted" in main
    assert probe.startswith("- information only, not a goal: the same check with task A (probe re-fit): MISSED")
    assert "diff masks (5%): task A (probe re-fit) +4.0, task B -1.0 points" in probe


def test_goal_on_its_bounds_is_met_and_just_below_is_missed():
    met = summarize(grid(), three_seeds(full_a=(0.7,) * 3, mask_a=(0.75,) * 3, mask_b=(0.84,) * 3))
    assert " met by diff masks (5%): task A (head kept) +5.0, task B -1.0" in check_trade_off(GOAL, met)[0]
    missed = summarize(grid(), three_seeds(full_a=(0.7,) * 3, mask_a=(0.74,) * 3, mask_b=(0.84,) * 3))
    assert ("MISSED: no masking row qualifies; the best on task A (head kept) within the task B bound: "
            "diff masks (5%): task A (head kept) +4.0") in check_trade_off(GOAL, missed)[0]
    lost = summarize(grid(), three_seeds(full_a=(0.6,) * 3, mask_a=(0.8,) * 3, mask_b=(0.83,) * 3))
    assert "MISSED: no masking row stays within the task B bound; the best on task A (head kept): diff masks" \
        in check_trade_off(GOAL, lost)[0]


def test_head_only_qualifying_is_stated_but_not_counted():
    records = three_seeds(full_a=(0.6,) * 3, mask_a=(0.62,) * 3)
    records += [record("head only", "head_only", seed, b=0.845, a=0.9, probe=0.92, changed=0.0) for seed in range(3)]
    line = check_trade_off(GOAL, summarize(grid(), records))[0]
    assert line.startswith("- masks keep A: MISSED: no masking row qualifies")
    assert "head only also qualifies but is not counted (only the head trains: the encoder does not change)" in line
    assert "not measured (no results for row 'full fine-tuning')" in check_trade_off(GOAL, summarize(
        grid(), [r for r in records if r["row"] != "full fine-tuning"]))[0]


def test_other_goal_forms_use_the_budget_as_target():
    summaries = summarize(grid(), three_seeds())
    goal = {"description": "B close", "row": "diff masks", "target": 0.05, "versus": "full fine-tuning",
            "versus_target": 1.0, "metric": "b_accuracy", "min_difference": -2}
    assert check_goals([goal], summaries) == ["- B close: -1.0000 (goal ≥ -2): met"]
    assert check_goals([GOAL], summaries)[0].startswith("- masks keep A: not checked (a trade-off goal")


GRID_TOML = """
name = "g"
[[rows]]
label = "dense"
method = "dense"
[[rows]]
label = "hc"
method = "hard_concrete"
target_sparsity = 0.5
[[goals]]
description = "hc keeps A"
versus = "dense"
"""


def test_grid_file_trade_off_goal_parses(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text(GRID_TOML + 'gain_metric = "a_accuracy_head"\nmin_gain = 5\nloss_metric = "b_accuracy"\n'
                    "max_loss = 1.0\nversus_target = 0.0\n")
    (goal,) = load_grid(path).goals
    assert goal["min_gain"] == 5 and goal["loss_metric"] == "b_accuracy" and goal["versus_target"] == 0.0


@pytest.mark.parametrize("extra, message", [
    ('gain_metric = "a"\nmin_gain = 5\nloss_metric = "b"\n', r"goal 1 has keys .*expected"),
    ('gain_metric = "a"\nmin_gain = 5\nloss_metric = "b"\nmax_loss = -1\n', r"max_loss = -1; expected >= 0"),
    ('gain_metric = "a"\nmin_gain = "5"\nloss_metric = "b"\nmax_loss = 1\n', r"min_gain = '5'; expected a number"),
    ('gain_metric = 3\nmin_gain = 5\nloss_metric = "b"\nmax_loss = 1\n', r"gain_metric = 3; expected a metric"),
    ('gain_metric = "a"\nmin_gain = 5\nloss_metric = "b"\nmax_loss = 1\nmetric = "x"\n', r"not metric"),
])
def test_grid_file_rejects_a_malformed_trade_off_goal(tmp_path, extra, message):
    path = tmp_path / "g.toml"
    path.write_text(GRID_TOML + extra)
    with pytest.raises(ValueError, match=message):
        load_grid(path)


def test_tables_written_with_their_cells_notes_and_goal(tmp_path):
    records = three_seeds()
    records.append(record("head only", "head_only", 0, b=0.80, a=0.9, probe=0.92, changed=0.0))
    summaries = write_interference_tables(grid(GOAL), records, tmp_path / "t", title="Interference",
                                          command="learnmask reproduce interference")
    assert [s.row for s in summaries] == ["full fine-tuning", "diff masks", "head only"]
    text = (tmp_path / "t.md").read_text()
    assert "Generated by `learnmask reproduce interference`; do not edit by hand." in text
    assert ("- subsets (0: all) and epochs: task A held out 500, task A epochs 2, task B training examples 2000, "
            "task B held out 0, task B epochs 1\n") in text  # settings the configs lack are not stated

    assert ("| full fine-tuning | 100% | 85.0 ± 0.0 | reference | 62.7 ± 7.6 | reference | 80.0 ± 0.0 | reference "
            "| 100 | – | 3 |") in text
    assert ("| diff masks | 5% | 84.0 ± 2.5 | -1.0 (p = 0.23, t) | 72.3 ± 6.3 | +9.7 (p = 0.041, t) | 84.0 ± 0.0 "
            "| +4.0 (p < 0.0001, t) | 4 | 5 | 3 |") in text
    # one shared seed and no correctness lists: Δ without a p-value
    assert "| head only | 100% | 80.0 | -5.0 | 90.0 | +30.0 | 92.0 | +12.0 | 0 | – | 1 |" in text
    assert "Tao et al., 2023" in text and "measured by diffing" in text and "not the mask's density" in text
    assert "`scipy.stats.ttest_rel`" in text and "`scipy.stats.binomtest(b, b + c, 0.5)`" in text
    assert "Before task B (after task A): task A 90.0% with its head, 92.0% with a probe (mean over 3 seeds)." in text
    assert "- masks keep A: met by diff masks (5%): task A (head kept) +9.7, task B -1.0 points" in text
    tex = (tmp_path / "t.tex").read_text()
    assert r"diff masks & 5\% & 84.0 $\pm$ 2.5 & -1.0 (p = 0.23, t)" in tex and r"\bottomrule" in tex


def test_no_records_for_the_grid_is_a_clear_error(tmp_path):
    other = [{**r, "grid": "other"} for r in three_seeds()]
    with pytest.raises(ValueError, match="no results for grid 'interference'; run `learnmask reproduce interference`"):
        write_interference_tables(grid(), other, tmp_path / "t", title="T", command="c")
    assert list(tmp_path.iterdir()) == []


def test_figure_written_and_false_without_records(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "f.png"
    assert plot_interference(three_seeds(), path, title="Interference")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1024
    assert plot_interference([], tmp_path / "none.png", title="T") is False
    assert not (tmp_path / "none.png").exists()


def test_settings_state_the_common_value_and_each_row_that_differs():
    from learnmask.recipe.interference_table import settings_lines

    records = [record("full fine-tuning", "full", 0, b=0.8, a=0.8, probe=0.9, changed=1.0),
               record("FISH", "fish", 0, b=0.8, a=0.8, probe=0.9, changed=0.005, budget=0.005),
               record("diff masks", "diff_masks", 0, b=0.8, a=0.8, probe=0.9, changed=0.005, budget=0.005)]
    for r, lr in zip(records, (1e-4, 1e-3, 1e-3)):
        r["config"]["lr"] = lr
    records.append({**records[0], "config": {**records[0]["config"], "lr": 1e-4}})
    lines = settings_lines(records)
    assert "- training: lr 0.0001" in lines
    assert lines[-2:] == ["- FISH: lr 0.001", "- diff masks: lr 0.001"]

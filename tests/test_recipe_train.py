"""The training recipe on a tiny model: resume is exact, eval keeps exactly k heads, methods differ."""
import pytest
import torch

from learnmask.recipe import gating
from learnmask.recipe import train as recipe
from learnmask.recipe.config import RunConfig
from learnmask.recipe.loop import TrainingDiverged


def config(**kw):
    base = dict(epochs=3, batch_size=16, freeze=(), lr=1e-3, test_size=64)
    return RunConfig(**{**base, **kw})


class Interrupt(Exception):
    pass


class interrupt_after:
    """A progress sink that stops the run (like Ctrl-C) after ``n`` steps."""

    def __init__(self, n):
        self.n, self.seen, self.total = n, 0, None

    def update(self, k=1):
        self.seen += k
        if self.seen == self.n:
            raise Interrupt


@pytest.mark.parametrize("method, controller", [("dense", "lagrangian"), ("hard_concrete", "lagrangian"),
                                                ("hard_concrete", "pi"), ("topk", "lagrangian")])
def test_interrupted_run_resumes_to_identical_result(tiny, tmp_path, method, controller):
    cfg = config(method=method, target_sparsity=0.0 if method == "dense" else 0.5, controller=controller,
                 gate_phase=0.9)
    straight = recipe.fit(cfg, tmp_path / "a", cache_dir=tmp_path / "cache")
    with pytest.raises(Interrupt):  # 6 steps per epoch: dies mid-way through epoch 2
        recipe.fit(cfg, tmp_path / "b", cache_dir=tmp_path / "cache", progress=interrupt_after(9))
    assert (tmp_path / "b" / "checkpoint.pt").exists()
    sink = interrupt_after(-1)
    resumed = recipe.fit(cfg, tmp_path / "b", cache_dir=tmp_path / "cache", progress=sink)
    assert sink.total == 18 and sink.seen == 18  # resumed at step 6 (end of epoch 1), counted from there
    assert resumed["accuracy"] == straight["accuracy"]
    assert resumed.get("head_mask") == straight.get("head_mask")
    assert resumed.get("controller_lambda_1") == straight.get("controller_lambda_1")
    assert resumed.get("control_overshoot") == straight.get("control_overshoot")  # the whole trajectory survived
    assert not (tmp_path / "b" / "checkpoint.pt").exists()  # a finished run leaves no checkpoint


@pytest.mark.parametrize("method, target, kept",
                         [("hard_concrete", 0.5, 4), ("topk", 0.75, 2), ("random", 0.5, 4), ("importance", 0.75, 2)])
def test_eval_keeps_exactly_the_target_number_of_heads(tiny, tmp_path, method, target, kept):
    metrics = recipe.fit(config(method=method, target_sparsity=target), tmp_path / method, cache_dir=tmp_path / "cache")
    assert metrics["heads_kept"] == kept and metrics["heads_total"] == 8
    assert sum(map(sum, metrics["head_mask"])) == kept
    assert metrics["realized_sparsity"] == pytest.approx(1 - kept / 8)
    assert metrics["parameters"] < metrics["parameters_dense"]
    if method == "importance":
        assert metrics["epochs"] == 4 and "accuracy_before_retraining" in metrics
        assert (tmp_path / "cache").glob("dense-*.pt")


def test_dense_learns_the_toy_task(tiny, tmp_path):
    metrics = recipe.fit(config(method="dense", epochs=15, lr=2e-3), tmp_path / "d", cache_dir=tmp_path / "cache")
    assert metrics["accuracy"] >= 0.9
    assert metrics["realized_sparsity"] == 0.0 and metrics["parameters"] == metrics["parameters_dense"]


def test_hard_concrete_expected_sparsity_follows_the_target(tiny, tmp_path):
    cfg = config(method="hard_concrete", target_sparsity=0.5, epochs=20, gate_phase=1.0, gate_lr=0.1,
                 controller_lr=0.05)
    metrics = recipe.fit(cfg, tmp_path / "hc", cache_dir=tmp_path / "cache")
    assert metrics["controller_target"] == 0.5
    assert abs(metrics["controller_sparsity"] - 0.5) < 0.1
    assert metrics["controller_lambda_1"] != 0.0


class DoNothing:
    """A controller that does nothing: no penalty, no update."""

    def penalty(self, s):
        return s * 0.0

    def step(self):
        pass

    def last_metrics(self):
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def acted(controller, final):
    """What each controller must achieve in 96 steps: Lagrangian and PI end at the 0.5 target; the
    fixed L0 penalty (no target) closes most gates. Without control the gates stay open (~0.001)."""
    return abs(final - 0.5) < 0.05 if controller in ("lagrangian", "pi") else final > 0.7


@pytest.mark.parametrize("controller", ["lagrangian", "pi", "fixed", "does-nothing"])
def test_every_controller_moves_the_expected_sparsity(tiny, tmp_path, monkeypatch, controller):
    """A controller that does nothing fails this test: its own case checks that it would."""
    if controller == "does-nothing":
        monkeypatch.setattr(gating, "make_controller", lambda cfg, target, name=None: DoNothing())
    cfg = config(method="hard_concrete", target_sparsity=0.5, epochs=16, gate_phase=1.0,
                 controller="lagrangian" if controller == "does-nothing" else controller)
    metrics = recipe.fit(cfg, tmp_path / controller, cache_dir=tmp_path / "cache")
    assert metrics["heads_kept"] == 4
    control = {"control_final_error", "control_overshoot", "control_tail_max_error", "control_settled"}
    assert len(control - set(metrics)) == 0
    final = metrics["trajectory"]["sparsity"][-1]  # expected head sparsity at the last step (96 points: every = 1)
    assert metrics["control_final_error"] == pytest.approx(abs(final - 0.5), abs=1e-4)
    if controller == "does-nothing":
        assert final < 0.05 and not any(acted(name, final) for name in ("lagrangian", "pi", "fixed"))
    else:
        assert acted(controller, final), final


def test_new_options_at_default_keep_old_run_keys():
    """Adding an option (here: controller) must not orphan results recorded before it existed."""
    assert RunConfig(method="hard_concrete", target_sparsity=0.9).key() == "93b58a5c2ab4a511"
    assert RunConfig(method="hard_concrete", target_sparsity=0.9, controller="pi").key() != "93b58a5c2ab4a511"


@pytest.mark.parametrize("controller", ["lagrangian", "pi"])
def test_controller_damping_reaches_the_controller(controller):
    cfg = RunConfig(method="hard_concrete", target_sparsity=0.5, controller=controller, controller_damping=30.0)
    assert recipe.make_controller(cfg, lambda step: 0.5).damping == 30.0
    assert recipe.make_controller(RunConfig(method="hard_concrete", target_sparsity=0.5, controller=controller),
                                  lambda step: 0.5).damping == 10.0
    with pytest.raises(ValueError, match="controller_damping must be >= 0"):
        RunConfig(method="hard_concrete", target_sparsity=0.5, controller_damping=-1.0)


def nan_on(monkeypatch, model, steps):
    """Make the model's loss NaN on the training forwards numbered ``steps`` (0-based)."""
    original, seen = type(model).forward, []

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training:
            seen.append(1)
            if len(seen) - 1 in steps:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(type(model), "forward", forward)


def test_non_finite_loss_skips_the_step_and_leaves_controller_state(tiny, tmp_path, monkeypatch):
    cfg = config(method="hard_concrete", target_sparsity=0.5, epochs=1, gate_phase=1.0)
    prepared = recipe.prepare(cfg, tmp_path)
    trainer = recipe.Trainer(cfg, prepared, tmp_path / "run")
    trainer.loop.max_skipped_fraction = 0.5
    batch = next(recipe.batches(prepared.train, list(range(16)), 16, 0))
    prepared.model.train()
    trainer.loop._step(dict(batch))
    state = dict(trainer.controller.state_dict())
    weights = {k: v.clone() for k, v in prepared.model.state_dict().items()}
    nan_on(monkeypatch, prepared.model, {0})
    trainer.loop._step(dict(batch))
    assert trainer.loop.skipped == 1 and trainer.loop.step == 2
    assert trainer.controller.state_dict() == state
    assert all(torch.equal(v, prepared.model.state_dict()[k]) for k, v in weights.items())


def test_a_few_skipped_steps_are_tolerated_and_recorded(tiny, tmp_path, monkeypatch):
    cfg = config(method="dense", epochs=4)  # 24 steps: up to 10%, i.e. 2, may be skipped
    model = recipe.prepare(cfg, tmp_path).model
    nan_on(monkeypatch, model, {3, 7})
    metrics = recipe.fit(cfg, tmp_path / "run", cache_dir=tmp_path / "cache")
    assert metrics["skipped_steps"] == 2


@pytest.mark.parametrize("nan_steps", [{3, 7, 9}, set(range(100))])
def test_a_run_with_too_many_non_finite_losses_is_a_failure_not_a_result(tiny, tmp_path, monkeypatch, nan_steps):
    cfg = config(method="hard_concrete", target_sparsity=0.5, epochs=4)
    model = recipe.prepare(cfg, tmp_path).model
    nan_on(monkeypatch, model, nan_steps)
    recorded = []
    with pytest.raises(TrainingDiverged,
                       match=r"3 of \d+ steps so far had a non-finite loss .* at most 10% of its 24 steps \(2\)"):
        recipe.fit(cfg, tmp_path / "run", cache_dir=tmp_path / "cache", record=recorded.append)
    assert recorded == []


def test_cubic_target_schedule_is_used(tiny, tmp_path):
    cfg = config(method="hard_concrete", target_sparsity=0.5, epochs=2, sparsity_schedule="cubic", sparsity_warmup=0.5)
    trainer = recipe.Trainer(cfg, recipe.prepare(cfg, tmp_path), tmp_path / "run")
    assert trainer.target(3) == pytest.approx(0.5 + (0.0 - 0.5) * (1 - 3 / 6) ** 3)
    with pytest.raises(ValueError, match="unknown sparsity_schedule 'square'"):
        config(sparsity_schedule="square")


def test_user_file_columns_reach_the_loader(tmp_path, monkeypatch):
    """dataset = "file" with its own column names; a missing column is named in the error."""
    path = tmp_path / "mine.csv"
    path.write_text("sentence,y\n" + "".join(f"text {i},{'a' if i % 2 else 'b'}\n" for i in range(10)))
    monkeypatch.setattr(recipe, "load_classifier", lambda *a: (_ for _ in ()).throw(RuntimeError("loaded data first")))
    cfg = RunConfig(dataset="file", dataset_path=str(path), text_column="sentence", label_column="y", test_size=2)
    with pytest.raises(RuntimeError, match="loaded data first"):  # the data loaded with these columns
        recipe._load(cfg)
    with pytest.raises(ValueError, match=r"no column 'text'; columns found: \['sentence', 'y'\]"):
        recipe._load(RunConfig(dataset="file", dataset_path=str(path), test_size=2))

"""The interference recipe (issue 14, item 5) on a tiny BERT and synthetic tasks: each method
changes exactly what it says, the diff against task A's weights counts what changed, the probe
fits, and a run interrupted mid-way resumes to the same numbers."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import synthetic, tiny_bert

from learnmask.recipe import interference as I
from learnmask.recipe.interference_config import InterferenceRunConfig
from learnmask.recipe.interference_methods import HEAD, Method, encoder_names

TINY = dict(a_train_examples=0, b_train_examples=0, batch_size=8, probe_examples=0, fisher_batches=2, lr=1e-3,
            a_lr=1e-3, head_lr=1e-2, mask_lr=3e-3, gate_lr=0.3, a_epochs=1, b_epochs=2)


class FakeData:
    """What :class:`learnmask.recipe.interference.Data` gives, on a tiny BERT and toy tasks."""

    def __init__(self, cfg):
        torch.manual_seed(cfg.seed)
        self.model = tiny_bert(num_labels=2).train()
        for module in self.model.modules():  # dropout, as the real model has: training draws random numbers
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.1
        self.pad_id = 0
        self.a_train, self.a_test = synthetic(48, 1), synthetic(24, 2)
        self.b_train, self.b_test = synthetic(40, 3), synthetic(24, 4)
        self.a_labels = self.b_labels = 2


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(I, "Data", FakeData)


def _cfg(method, budget=1.0, **kw):
    return InterferenceRunConfig(method=method, budget=budget, **{**TINY, **kw})


def _run(cfg, tmp_path):
    return I.fit_interference(cfg, tmp_path / f"run-{cfg.key()}", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("values, message", [
    ({"method": "lora"}, "unknown method 'lora'"),
    ({"method": "fish", "budget": 0.0}, "budget must be a fraction in (0, 1]"),
    ({"method": "fish", "budget": 1.5}, "budget must be a fraction in (0, 1]"),
    ({"method": "full", "budget": 0.5}, "method 'full' has no budget"),
    ({"diff_fixed_fraction": 1.0}, "diff_fixed_fraction must be in [0, 1)"),
    ({"gate_lr": 0.0}, "gate_lr must be > 0"),
    ({"b_test_examples": 0}, "b_test_examples must be >= 1"),
])
def test_config_rejects_bad_values(values, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        InterferenceRunConfig(**values)


def test_task_a_key_ignores_task_b_settings():
    a, b = InterferenceRunConfig(method="full"), InterferenceRunConfig(method="fish", budget=0.01, lr=1e-4)
    assert a.task_a_key() == b.task_a_key() and a.key() != b.key()
    assert a.task_a_key() != InterferenceRunConfig(a_lr=1e-4).task_a_key()


def test_changed_entries_counts_by_hand():
    before = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.0, 0.0])}
    after = {"w": torch.tensor([[1.0, 2.5], [3.0, -4.0]]), "b": torch.tensor([0.0, 1e-9])}
    assert I.changed_entries(before, after, ["w", "b"]) == 3
    assert I.changed_entries(before, after, ["w"]) == 2


def test_probe_separates_separable_features_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (90,), generator=g)
    centres = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]], dtype=torch.float64)
    x = centres[labels] + 0.3 * torch.randn(90, 3, generator=g, dtype=torch.float64)
    first = I.probe_correct(x[:60], labels[:60].tolist(), x[60:], labels[60:].tolist(), 3)
    assert first == [1] * 30
    shuffled_labels = labels[:60][torch.randperm(60, generator=g)]  # labels unrelated to the features
    chance = I.probe_correct(x[:60], shuffled_labels.tolist(), x[60:], labels[60:].tolist(), 3)
    assert sum(chance) < 20
    assert I.probe_correct(x[:60], labels[:60].tolist(), x[60:], labels[60:].tolist(), 3) == first


def test_phases_split_one_batch_stream():
    data = synthetic(40, 3)
    whole = I.PhaseTask(None, data, batch_size=8, pad_id=0, seed=1, epochs=2)
    first = I.PhaseTask(None, data, batch_size=8, pad_id=0, seed=1, epochs=2, offset=0, steps=7)
    second = I.PhaseTask(None, data, batch_size=8, pad_id=0, seed=1, epochs=2, offset=7, steps=3)
    ids = lambda task, start=0: [b["input_ids"].tolist() for b in task.batches(start)]  # noqa: E731
    assert whole.total_steps == 10 and len(ids(whole)) == 10
    assert ids(first) + ids(second) == ids(whole)
    assert ids(second, 1) == ids(whole)[8:]


def _step_method(cfg, steps=3):
    """A tiny model with task B's head, the method on it, and ``steps`` AdamW steps."""
    torch.manual_seed(0)
    model = tiny_bert(num_labels=2).train()
    data = synthetic(32, 3)
    fisher = lambda size: I.batches(data, list(range(len(data))), size, 0)  # noqa: E731
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = Method(cfg, model, fisher)
    method.start(0, steps)
    optimizer = torch.optim.AdamW(method.groups(0))
    method.attach(optimizer)
    for batch in list(fisher(8))[:steps]:
        labels = batch.pop("labels")
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
        penalty = method.penalty()
        (loss if penalty is None else loss + penalty).backward()
        optimizer.step()
        optimizer.zero_grad()
        method.after_step(False)
    return model, method, before


def test_freeze_bottom_changes_only_the_top_half_and_head():
    model, method, before = _step_method(_cfg("freeze_bottom"))
    after = dict(model.named_parameters())
    for name, value in before.items():
        frozen = name.startswith("bert.embeddings.") or name.startswith("bert.encoder.layer.0.")
        assert torch.equal(after[name], value) == frozen, name
    names = encoder_names(model)
    trainable = sum(before[n].numel() for n in names if not (n.startswith("bert.embeddings.")
                                                             or n.startswith("bert.encoder.layer.0.")))
    assert method.density == trainable / sum(before[n].numel() for n in names)


def test_head_only_leaves_the_encoder_bit_identical():
    model, method, before = _step_method(_cfg("head_only"))
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], before[n]) for n in encoder_names(model))
    assert not torch.equal(after["classifier.weight"], before["classifier.weight"])
    assert method.final_density() == 0.0


@pytest.mark.parametrize("method, budget", [("child_tuning_d", 0.2), ("fish", 0.05)])
def test_fisher_masks_hold_every_masked_entry_under_adamw(method, budget):
    model, m, before = _step_method(_cfg(method, budget, weight_decay=0.1), steps=4)
    masks = m.update_masks.masks()
    after = dict(model.named_parameters())
    for name, mask in masks.items():
        assert torch.equal(after[name][~mask], before[name][~mask]), name
    names = encoder_names(model)
    chosen = names + list(HEAD) if method == "fish" else names
    total = sum(before[n].numel() for n in chosen)
    assert sum(int(masks[n].sum()) for n in chosen) == round(budget * total)
    if method == "fish":  # the head is counted inside the budget, whole
        assert all(bool(masks[n].all()) for n in HEAD)
    changed = I.changed_entries(before, {n: p.detach() for n, p in after.items()}, names)
    assert 0 < changed <= sum(int(masks[n].sum()) for n in names)


def test_child_tuning_f_draws_a_new_mask_each_step():
    model, m, before = _step_method(_cfg("child_tuning_f", 0.5), steps=1)
    after = dict(model.named_parameters())
    names = encoder_names(model)
    changed = I.changed_entries(before, {n: p.detach() for n, p in after.items()}, names)
    total = sum(before[n].numel() for n in names)
    assert 0.4 < changed / total < 0.6  # one step: about p of the entries
    model, m, before = _step_method(_cfg("child_tuning_f", 0.5), steps=4)
    changed = I.changed_entries(before, {n: p.detach() for n, p in model.named_parameters()}, names)
    assert changed / total > 0.85  # 1 - 0.5^4 = 0.94 of them drawn at least once


def test_weight_masks_change_only_entries_masked_to_zero():
    model, m, before = _step_method(_cfg("weight_masks", mask_lr=0.01), steps=4)
    plain = m.plain_weights()
    masks = m.weight_masks.binary_masks()
    assert m.final_density() < 1.0
    for name in (n for n in before if n.startswith("bert.")):
        if name in masks:
            assert torch.equal(plain[name], before[name] * masks[name])
        else:
            assert torch.equal(plain[name], before[name]), name


def test_diff_masks_end_at_exactly_the_budget(tmp_path, fake):
    cfg = _cfg("diff_masks", 0.05)
    metrics = _run(cfg, tmp_path)
    total = metrics["encoder_parameters"]
    assert metrics["mask_density"] == round(0.05 * total) / total
    assert 0 < metrics["changed_parameters"] <= round(0.05 * total)
    trajectory = metrics["diff_density_trajectory"]
    assert trajectory["every"] == 1 and len(trajectory["density"]) == 10  # 7 steps of stage (a), 3 fixed
    assert trajectory["density"][6] < trajectory["density"][0] - 0.01  # the controller pushes it down
    assert trajectory["density"][7:] == [round(round(0.05 * total) / total, 5)] * 3


def test_fit_records_what_the_table_reads(tmp_path, fake):
    full = _run(_cfg("full"), tmp_path)
    head = _run(_cfg("head_only"), tmp_path)
    for metrics in (full, head):
        assert len(metrics["b_correct"]) == 24 and len(metrics["a_correct_head"]) == 24
        assert metrics["b_accuracy"] == sum(metrics["b_correct"]) / 24
        assert metrics["a_probe_after"] == sum(metrics["a_probe_correct"]) / 24
    assert full["a_accuracy_before"] == head["a_accuracy_before"]  # one task-A model per seed
    assert full["fraction_changed"] == 1.0 or full["fraction_changed"] > 0.99
    # nothing in the encoder moved: task A's head and probe see the features they saw before task B
    assert head["fraction_changed"] == 0.0 and head["changed_parameters"] == 0
    assert head["a_accuracy_head"] == head["a_accuracy_before"]
    assert head["a_probe_after"] == head["a_probe_before"]


class _Stop(Exception):
    pass


class _StopAfter:
    """A progress object that interrupts training after ``n`` steps in all."""

    total = None

    def __init__(self, n):
        self.n = n

    def update(self, k=1):
        self.n -= k
        if self.n < 0:
            raise _Stop


@pytest.mark.parametrize("method, budget, stop", [("diff_masks", 0.05, 8), ("child_tuning_f", 0.5, 3)])
def test_an_interrupted_run_resumes_to_the_same_numbers(tmp_path, fake, monkeypatch, method, budget, stop):
    monkeypatch.setattr(I, "CHECKPOINT_EVERY", 2)
    cfg = dataclasses.replace(_cfg(method, budget))
    straight = _run(cfg, tmp_path / "straight")
    run_dir = tmp_path / "resumed" / f"run-{cfg.key()}"
    # task A's model is trained once per seed and cached: stop after it and some task-B steps
    steps_a = 6  # 48 examples / batch 8
    with pytest.raises(_Stop):
        I.fit_interference(cfg, run_dir, cache_dir=tmp_path / "resumed" / "cache", progress=_StopAfter(steps_a + stop))
    resumed = I.fit_interference(cfg, run_dir, cache_dir=tmp_path / "resumed" / "cache")
    keys = ("b_correct", "a_correct_head", "a_probe_correct", "changed_parameters", "mask_density")
    assert {k: resumed[k] for k in keys} == {k: straight[k] for k in keys}


def test_task_b_does_not_depend_on_whether_task_a_was_cached(tmp_path, fake):
    """The first cell of a seed trains task A in its process, the others read it from the cache:
    task B's random draws (dropout; here the diff masks' gate samples) must be the same either way
    (they once came after task A's)."""
    cfg = _cfg("diff_masks", 0.05)
    trained = _run(cfg, tmp_path / "fresh")
    other = tmp_path / "cached"
    _run(_cfg("head_only"), other)  # fills the cache
    cached = _run(cfg, other)
    assert cached["b_correct"] == trained["b_correct"] and cached["a_correct_head"] == trained["a_correct_head"]
    assert cached["changed_parameters"] == trained["changed_parameters"]

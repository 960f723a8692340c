"""The classification recipe gates what a mask table says (a new study is a grid row, not a new
loop), and every gated run ends finalized: checked against the gated model, counted, timed."""
import contextlib

import pytest
import torch
from test_recipe_train import config

from learnmask.recipe import measure
from learnmask.recipe import train as recipe
from learnmask.recipe.config import RunConfig
from learnmask.recipe.mask_spec import MaskSpec


def test_a_preset_is_its_mask_table(tiny, tmp_path):
    """method = "hard_concrete" and the same gates written as a table train identically."""
    preset = config(method="hard_concrete", target_sparsity=0.5, epochs=2, gate_phase=0.5)
    table = config(method="gates", target_sparsity=0.5, epochs=2, gate_phase=0.5,
                   masks={"units": ["heads"], "gate": "hard_concrete", "gate_options": {"init_log_alpha": 3.0}})
    assert preset.mask_spec() == table.mask_spec() and preset.key() != table.key()
    a = recipe.fit(preset, tmp_path / "a", cache_dir=tmp_path / "cache")
    b = recipe.fit(table, tmp_path / "b", cache_dir=tmp_path / "cache")
    for name in ("accuracy", "head_mask", "controller_lambda_1", "parameters", "control_overshoot"):
        assert a[name] == b[name], name


def test_heads_and_ffn_to_a_parameter_target_are_finalized_and_timed(tiny, tmp_path):
    cfg = config(method="gates", target_sparsity=0.4, epochs=3, gate_phase=0.5,
                 masks={"units": ["heads", "ffn"], "sparsity": "parameters", "gate_options": {"init_log_alpha": 0.5}})
    metrics = recipe.fit(cfg, tmp_path / "run", cache_dir=tmp_path / "cache")
    assert set(metrics["units_kept"]) == {"heads", "ffn"} and metrics["units_kept"]["ffn"][1] == 2 * 64
    assert metrics["realized_sparsity"] == metrics["realized_parameter_sparsity"] > 0
    assert metrics["parameters"] == metrics["finalized_parameters"] < metrics["parameters_dense"]
    assert metrics["finalized_accuracy"] == metrics["accuracy"]
    assert metrics["finalize_max_logit_diff"] < 1e-4
    assert metrics["speedup"] > 0
    assert metrics["throughput"]["batch_size"] == 32 and metrics["throughput"]["threads"] == 2
    assert metrics["epochs"] == 3


@pytest.mark.parametrize("masks, kept", [
    ({"units": ["ffn"], "gate": "random"}, {"ffn": 64}),
    ({"units": ["heads"], "gate": "gumbel_sigmoid", "controller": "pi"}, {"heads": 4}),
    ({"units": ["heads", "ffn"], "gate": "importance"}, {"heads": 4, "ffn": 64}),
])
def test_other_gate_kinds_and_units_are_grid_rows(tiny, tmp_path, masks, kept):
    cfg = config(method="gates", target_sparsity=0.5, epochs=1, masks=masks, importance_epochs=1)
    metrics = recipe.fit(cfg, tmp_path / "run", cache_dir=tmp_path / "cache")
    assert {name: metrics["units_kept"][name][0] for name in kept} == kept
    assert metrics["parameters"] == metrics["finalized_parameters"] < metrics["parameters_dense"]
    assert metrics["epochs"] == (2 if masks["gate"] == "importance" else 1)


def test_a_dense_run_is_timed_alone(tiny, tmp_path):
    metrics = recipe.fit(config(method="dense", epochs=1), tmp_path / "run", cache_dir=tmp_path / "cache")
    assert metrics["speedup"] == 1.0 and metrics["throughput"]["examples_per_second"] > 0


@pytest.mark.parametrize("values, message", [
    ({"units": ["heads", "neurons"]}, r"masks.units must name each of"),
    ({"gate": "fixed"}, r"masks.gate must be one of \[.*'random', 'importance'\]"),
    ({"gate": "random", "controller": "pi"}, "fixed before fine-tuning: it needs controller 'none'"),
    ({"controller": "schedule"}, "'schedule' moves the k of top-k gates"),
    ({"sparsity": "flops"}, r"masks.sparsity must be one of \['units', 'parameters'\]"),
    ({"gate_options": {"init_log_alpha": float("nan")}}, "masks.gate_options.init_log_alpha must be a finite number"),
    ({"unit": ["heads"]}, r"unknown key\(s\) \['unit'\] in masks"),
])
def test_bad_mask_tables_are_clear_errors(values, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_dict({"method": "gates", "target_sparsity": 0.5, "masks": values}, where="row")


def test_masks_belong_to_method_gates_and_the_controller_is_said_once():
    with pytest.raises(ValueError, match="masks is read with method = 'gates' only; got method 'topk'"):
        RunConfig(method="topk", target_sparsity=0.5, masks={"units": ["ffn"]})
    with pytest.raises(ValueError, match="controller is given twice"):
        RunConfig(method="gates", target_sparsity=0.5, controller="pi", masks={"controller": "fixed"})
    assert RunConfig(method="gates", target_sparsity=0.5, controller="pi").mask_spec().controller == "pi"
    spec = RunConfig(method="gates", target_sparsity=0.5, masks={"gate": "topk"}).mask_spec()
    assert spec == MaskSpec(gate="topk", controller="schedule")
    # stored with every key filled in: two spellings of one table are one run
    assert RunConfig(method="gates", target_sparsity=0.5).key() == RunConfig(
        method="gates", target_sparsity=0.5, masks={"units": ["heads"], "sparsity": "units"}).key()


def test_a_finalized_model_that_predicts_otherwise_or_has_another_size_is_an_error():
    data = recipe.EncodedTexts([[1, 2]] * 3, [0, 1, 1])
    gated = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0 + 5e-5]])  # the last example is a tie
    close = measure.check_finalized(gated, gated + 1e-6, data, parameters=5, finalized_parameters=5)
    assert close["finalized_accuracy"] == 1.0
    tie_broken = gated.clone()
    tie_broken[2] = torch.tensor([1.0 + 5e-5, 1.0])  # a tie may break the other way: recorded, not an error
    broken = measure.check_finalized(gated, tie_broken, data, parameters=5, finalized_parameters=5)
    assert broken["finalized_accuracy"] == pytest.approx(2 / 3)
    flipped = gated.clone()
    flipped[0] = torch.tensor([0.0, 2.0])
    with pytest.raises(measure.FinalizeMismatch, match="predicts 1 held-out examples differently"):
        measure.check_finalized(gated, flipped, data, parameters=5, finalized_parameters=5)
    with pytest.raises(measure.FinalizeMismatch, match="has 6 parameters; the gates reported 5"):
        measure.check_finalized(gated, gated, data, parameters=5, finalized_parameters=6)


def test_throughput_is_the_median_of_interleaved_passes_on_two_threads(monkeypatch):
    order, threads = [], []

    class Model(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, input_ids, attention_mask):
            threads.append(torch.get_num_threads())
            if not order or order[-1] != self.name:
                order.append(self.name)

    before = torch.get_num_threads()
    clock = iter(range(1000))
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(clock))
    data = recipe.EncodedTexts([[1, 2, 3]] * 300, [0] * 300)
    models = {"a": (Model("a"), contextlib.nullcontext), "b": (Model("b"), contextlib.nullcontext)}
    speed = measure.measure_throughput(models, data, 0)
    assert order == ["a", "b"] * 8  # a warm-up pass, then 7 timed passes, alternating
    assert set(threads) == {2} and torch.get_num_threads() == before
    assert speed == {"a": 128.0, "b": 128.0}  # 128 examples (4 batches of 32) per pass of 1 clock tick
    # load that slows most timed passes of "b" (10 ticks instead of 1) does not move its throughput: the
    # fastest pass counts (a median would give 12.8)
    ticks = iter([0, 1] * 2 + [0, 1, 0, 10] * 4 + [0, 1] * 6)
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(ticks))
    order.clear()
    assert measure.measure_throughput(models, data, 0) == {"a": 128.0, "b": 128.0}

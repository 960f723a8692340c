"""Masking-rate schedules, the loss-adaptive controller on an MLM rate, the MLM run config and grid."""
import math

import pytest

from learnmask.control import LossAdaptiveController
from learnmask.control.rate_schedules import ConstantRate, CosineDecay, LinearDecay, make_rate_schedule
from learnmask.recipe.config import load_grid
from learnmask.recipe.mlm_config import MLMRunConfig


def test_linear_decay_30_to_15_values():
    schedule = LinearDecay(0.30, 0.15, 100)
    assert [schedule(t) for t in (0, 50, 100, 1000)] == pytest.approx([0.30, 0.225, 0.15, 0.15])


def test_cosine_decay_is_flat_at_the_ends_and_halfway_in_the_middle():
    schedule = CosineDecay(0.30, 0.15, 100)
    assert schedule(0) == pytest.approx(0.30) and schedule(50) == pytest.approx(0.225) and schedule(100) == 0.15
    assert schedule(1) - schedule(0) > -0.0001  # slope ~0 at 0
    assert abs(schedule(51) - schedule(50)) > 0.002  # steep at 50
    assert schedule(25) == pytest.approx(0.15 + 0.15 * (1 + math.cos(math.pi / 4)) / 2)


def test_constant_and_factory_and_errors():
    assert make_rate_schedule("constant", 0.4, 0.1, 10)(7) == 0.4
    assert isinstance(make_rate_schedule("cosine", 0.3, 0.15, 10), CosineDecay)
    assert LinearDecay(0.15, 0.3, 0)(0) == 0.3  # zero length: final from step 0; rising is allowed
    with pytest.raises(ValueError, match="unknown rate schedule kind 'step'"):
        make_rate_schedule("step", 0.3, 0.15, 10)
    with pytest.raises(ValueError, match=r"initial must be in \[0, 1\]"):
        LinearDecay(1.3, 0.15, 10)
    with pytest.raises(ValueError, match="step must be >= 0"):
        ConstantRate(0.15)(-1)


def test_loss_adaptive_controller_raises_the_rate_while_loss_falls_and_lowers_it_when_loss_rises():
    controller = LossAdaptiveController(0.15, r_min=0.15, r_max=0.4, harder="up", ema=0.5, max_step=0.01)
    for loss in [5.0 - 0.1 * i for i in range(11)]:
        controller.update(loss)
    assert controller.ratio == pytest.approx(0.25)  # 10 easy steps after the first sets the level
    for loss in [5.0 + 0.1 * i for i in range(5)]:
        controller.update(loss)
    assert controller.ratio == pytest.approx(0.20)
    for _ in range(100):
        controller.update(0.0)
    assert controller.ratio == 0.4  # bounded


def test_capping_the_loss_adaptive_controller_clips_its_ratio_and_bounds_later_moves():
    controller = LossAdaptiveController(1.0, r_min=0.5, r_max=1.0, harder="down", max_step=0.1)
    assert controller.cap(0.8) == 0.8 and controller.r_max == 0.8
    for loss in (1.0, 2.0, 4.0):  # hard every time after the first: moves toward more tokens, stopped at the cap
        controller.update(loss)
    assert controller.ratio == 0.8
    assert controller.cap(0.9) == 0.8  # raising the cap does not move the ratio
    with pytest.raises(ValueError, match=r"r_max must be >= r_min = 0.5; got 0.4"):
        controller.cap(0.4)
    with pytest.raises(ValueError, match=r"r_max must be in \[0, 1\].*got 1.5"):
        controller.cap(1.5)

    state = controller.state_dict()  # the moved bound is state: a restored controller keeps it
    assert state["r_max"] == 0.9
    restored = LossAdaptiveController(1.0, r_min=0.5, r_max=1.0, harder="down", max_step=0.1)
    restored.load_state_dict(state)
    assert (restored.ratio, restored.r_max) == (0.8, 0.9)
    older = {k: v for k, v in state.items() if k != "r_max"}  # saved before cap() existed: the configured bound
    restored = LossAdaptiveController(1.0, r_min=0.5, r_max=1.0, harder="down", max_step=0.1)
    restored.load_state_dict(older)
    assert (restored.ratio, restored.r_max) == (0.8, 1.0)
    with pytest.raises(ValueError, match=r"ratio must be in \[r_min, r_max\] = \[0.5, 0.6\]; got 0.8"):
        restored.load_state_dict({**state, "r_max": 0.6})


def test_mlm_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['mlm_prob'\]"):
        MLMRunConfig.from_dict({"mlm_prob": 0.3})
    with pytest.raises(ValueError, match=r"mlm_probability must be in \[0, 1\]"):
        MLMRunConfig(mlm_probability=1.5)
    with pytest.raises(ValueError, match="unknown schedule 'exp'"):
        MLMRunConfig(schedule="exp")
    with pytest.raises(ValueError, match=r"must lie in \[rate_min, rate_max\]"):
        MLMRunConfig(schedule="adaptive", mlm_probability=0.5, rate_max=0.4)
    assert MLMRunConfig(schedule="linear").head_key() == MLMRunConfig(schedule="adaptive").head_key()
    assert MLMRunConfig(seed=1).head_key() != MLMRunConfig().head_key()
    assert MLMRunConfig(schedule="linear").key() != MLMRunConfig().key()


def test_mlm_grid_expands_rows_times_seeds(tmp_path):
    path = tmp_path / "mlm.toml"
    path.write_text('name = "mlm"\nrecipe = "mlm"\nseeds = [0]\nfull_seeds = [0, 1, 2]\n[defaults]\nsteps = 5\n'
                    '[[rows]]\nlabel = "15%"\n[[rows]]\nlabel = "decay"\nschedule = "linear"\nmlm_probability = 0.3\n')
    grid = load_grid(path)
    cells = grid.cells(full=True, overrides={"batch_size": 4})
    assert [(label, c.schedule, c.seed, c.steps, c.batch_size) for label, c in cells] == [
        ("15%", "constant", 0, 5, 4), ("15%", "constant", 1, 5, 4), ("15%", "constant", 2, 5, 4),
        ("decay", "linear", 0, 5, 4), ("decay", "linear", 1, 5, 4), ("decay", "linear", 2, 5, 4)]
    with pytest.raises(ValueError, match="seed"):
        grid.cells(overrides={"seed": 3})
    path.write_text('name = "mlm"\nrecipe = "mlm"\n[[rows]]\nlabel = "x"\ntarget_sparsity = 0.5\n')
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['target_sparsity'\] in grid 'mlm', row 'x'"):
        load_grid(path)
    path.write_text('name = "mlm"\nrecipe = "bert"\n[[rows]]\nlabel = "x"\n')
    with pytest.raises(ValueError, match="unknown recipe 'bert'"):
        load_grid(path)


def test_the_shipped_mlm_grid_has_the_five_schedules():
    grid = load_grid("experiments/grids/mlm.toml")
    rows = {label: cfg for label, cfg in grid.cells()}
    assert len(rows) == 5 and len(grid.cells(full=True)) == 15
    policies = sorted((c.schedule, c.mlm_probability, c.final_mlm_probability if c.schedule == "linear" else None)
                      for c in rows.values())
    assert policies == [("adaptive", 0.15, None), ("constant", 0.15, None), ("constant", 0.3, None),
                        ("constant", 0.4, None), ("linear", 0.3, 0.15)]

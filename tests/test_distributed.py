"""DDP scale-out (issue 15): the helpers of :mod:`learnmask.distributed` and
:mod:`learnmask.sampling` in one process, and real 2-process gloo runs under ``torchrun``
(tests/ddp_worker.py, tests/ddp_grads_worker.py) checked against a 1-process run.

Bound stated for the 1-process comparison: weights within 1e-6 (fp32 gradients summed over two
ranks instead of over one batch: reduction order only), multipliers within 1e-9.
"""
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from learnmask import distributed
from learnmask.functional import hard_concrete_sample
from learnmask.sampling import StepSampling, derive_seed, generator_for, step_sampling

HERE = pathlib.Path(__file__).resolve().parent
CONFIG = {"method": "hard_concrete", "target_sparsity": 0.5, "epochs": 2, "batch_size": 8, "max_train_examples": 60,
          "seed": 3}
WEIGHT_BOUND, MULTIPLIER_BOUND = 1e-6, 1e-9


# -- one process ---------------------------------------------------------------------------


def test_shard_gives_contiguous_slices_whose_weighted_means_are_the_global_mean():
    batch = {"input_ids": torch.arange(14).reshape(7, 2), "labels": torch.arange(7), "note": "kept"}
    parts = [distributed.shard(batch, r, 3) for r in range(3)]
    assert [p["labels"].tolist() for p, _ in parts] == [[0, 1], [2, 3], [4, 5, 6]]
    assert [p["note"] for p, _ in parts] == ["kept"] * 3
    losses = torch.arange(7, dtype=torch.float64) ** 2  # per-example losses
    means = [losses[p["labels"]].mean() * w for p, w in parts]
    assert math.isclose(sum(means) / 3, losses.mean().item(), rel_tol=1e-12)
    assert [w for _, w in parts] == [6 / 7, 6 / 7, 9 / 7]


def test_shard_refuses_fewer_examples_than_ranks_and_ragged_batches():
    with pytest.raises(ValueError, match="batch of 1 example.*2 ranks"):
        distributed.shard(torch.zeros(1, 3), 0, 2)
    with pytest.raises(ValueError, match=r"leading \(batch\) size.*\[3, 4\]"):
        distributed.shard({"a": torch.zeros(3), "b": torch.zeros(4)}, 0, 2)


def test_a_world_size_that_does_not_divide_the_batch_is_named_with_sizes_that_would_do():
    with pytest.raises(ValueError, match="batch_size 6 .* 4 ranks.*use 4, 8"):
        distributed.check_divisible(6, 4)
    distributed.check_divisible(8, 4)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_nccl_for_a_cpu_model_or_without_cuda_is_a_clear_error(device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="gloo"):
        distributed.check_backend("nccl", device)
    with pytest.raises(ValueError, match="one of"):
        distributed.check_backend("mpi", "cpu")


def test_init_outside_torchrun_checks_the_backend_and_starts_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="nccl backend cannot run a model on cpu"):
        distributed.init_from_environment("nccl")
    assert distributed.init_from_environment("gloo") is False
    assert not torch.distributed.is_initialized()


def test_outside_a_process_group_the_collectives_are_identities():
    t = torch.tensor([1.5, -2.0])
    assert distributed.mean(0.25) == 0.25 and distributed.mean_(t) is t and t.tolist() == [1.5, -2.0]
    assert distributed.all_true(True) and not distributed.all_true(False)
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.on_main(lambda x: x + 1, 1) == 2
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)


def test_step_sampling_depends_on_run_and_step_only_and_folds_the_rank_into_per_example_draws():
    log_alpha = torch.zeros(4, 6)

    def draw(seed, step, rank=0, stream="shared"):
        torch.manual_seed(rank + 100)  # the global RNG must not matter inside a step
        with step_sampling(seed, step, rank):
            return hard_concrete_sample(log_alpha, generator=generator_for("cpu", stream))

    assert torch.equal(draw("run", 5), draw("run", 5, rank=1))  # shared: the same on every rank
    assert not torch.equal(draw("run", 5), draw("run", 6))
    assert not torch.equal(draw("run", 5), draw("other", 5))
    assert not torch.equal(draw("run", 5, 0, "per_example"), draw("run", 5, 1, "per_example"))
    assert generator_for("cpu") is None  # outside a step: torch's global generator
    assert derive_seed("run", 5) == derive_seed("run", 5) != derive_seed("run", 6)
    with pytest.raises(ValueError, match="stream must be one of"):
        StepSampling("run", 0).generator("cpu", "tokens")


def test_accumulation_in_one_process_trains_like_one_batch(tiny, tmp_path):
    from learnmask.recipe import train as recipe
    from learnmask.recipe.config import RunConfig

    finals = []
    for accumulation in (1, 2, 3):
        cfg = RunConfig.from_dict(CONFIG, where="test")
        prepared = recipe.prepare(cfg, tmp_path / "cache")
        trainer = recipe.Trainer(cfg, prepared, tmp_path / f"run{accumulation}")
        trainer.loop.accumulation_steps = accumulation
        trainer.run()
        finals.append((prepared.model.state_dict(), trainer.controller.state_dict(), trainer.loop.losses))
    (base, base_controller, base_losses), *others = finals
    for weights, controller, losses in others:
        assert max((weights[k] - base[k]).abs().max().item() for k in base) <= WEIGHT_BOUND
        assert all(abs(controller[k] - base_controller[k]) <= MULTIPLIER_BOUND for k in base_controller)
        assert max(abs(a - b) for a, b in zip(losses, base_losses)) <= WEIGHT_BOUND


def test_accumulation_steps_must_be_a_positive_int(tiny, tmp_path):
    from learnmask.recipe.loop import TrainingLoop

    class Task:
        model = torch.nn.Linear(2, 2)

    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="accumulation_steps must be an int >= 1"):
            TrainingLoop(Task(), torch.optim.SGD(Task.model.parameters(), lr=0.1), lambda _: 1.0, tmp_path,
                         key="k", accumulation_steps=bad)


# -- two processes (gloo) under torchrun ------------------------------------------------------


def torchrun(nproc: int, script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               str(HERE / script), *args]  # --standalone: torchrun picks a free port itself
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)


def _fit(out: pathlib.Path, nproc: int, config: dict, *extra: str, env: dict | None = None) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    done = torchrun(nproc, "ddp_worker.py", str(out), json.dumps(config), *extra, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(nproc)]


def _max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return _fit(tmp_path_factory.mktemp("one"), 1, CONFIG)[0]


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", [1, 2])
def test_two_ranks_equal_each_other_exactly_and_the_one_process_run_within_bound(one_process, tmp_path,
                                                                                   accumulation):
    ranks = _fit(tmp_path, 2, CONFIG, str(accumulation))
    assert [r["world"] for r in ranks] == [2, 2] and one_process["world"] == 1
    first, second = ranks
    assert all(torch.equal(first["model"][k], second["model"][k]) for k in first["model"])
    assert first["controller"] == second["controller"] and first["losses"] == second["losses"]
    assert _max_weight_diff(first["model"], one_process["model"]) <= WEIGHT_BOUND
    # the gates (fixed after the gate phase: +-10 per head) are the 1-process run's exactly
    assert torch.equal(first["model"]["learnmask_gates.heads.log_alpha"],
                       one_process["model"]["learnmask_gates.heads.log_alpha"])
    for key, value in one_process["controller"].items():
        assert abs(first["controller"][key] - value) <= MULTIPLIER_BOUND, key
    assert max(abs(a - b) for a, b in zip(first["losses"], one_process["losses"])) <= WEIGHT_BOUND


@pytest.mark.slow
def test_random_baseline_is_the_same_on_both_ranks(tmp_path):
    first, second = _fit(tmp_path, 2, {**CONFIG, "method": "random"})
    assert all(torch.equal(first["model"][k], second["model"][k]) for k in first["model"])
    assert int((first["model"]["learnmask_gates.heads.log_alpha"] > 0).sum()) == 4  # 50% of 2 x 4 heads


@pytest.mark.slow
def test_a_run_killed_under_torchrun_resumes_to_the_uninterrupted_result(tmp_path):
    uninterrupted = _fit(tmp_path / "whole", 2, CONFIG)
    out = tmp_path / "killed"
    out.mkdir()
    killed = torchrun(2, "ddp_worker.py", str(out), json.dumps(CONFIG), env={"STOP_AT": "8"})
    assert killed.returncode != 0 and (out / "run" / "checkpoint.pt").exists()
    resumed = _fit(out, 2, CONFIG)
    for before, after in zip(uninterrupted, resumed):
        assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
        assert before["controller"] == after["controller"] and before["losses"] == after["losses"]


@pytest.mark.slow
def test_a_model_saved_from_rank_0_loads_strictly_into_a_single_process_model(tmp_path):
    from conftest import tiny_bert

    import learnmask as lm
    from learnmask.gates import FixedGate

    rank0 = _fit(tmp_path, 2, CONFIG)[0]["model"]
    plain = tiny_bert(num_labels=2, layers=2, heads=4)
    base_keys = set(plain.state_dict())
    # only the gates' own state joins the model's: no "module." prefix, no caches, no buffers of learnmask's
    assert set(rank0) - base_keys == {"learnmask_gates.heads.log_alpha"}
    handle = lm.apply_masks(plain, heads=True, gates={"heads": FixedGate(torch.ones(2, 4))})
    plain.load_state_dict(rank0, strict=True)
    kept = (rank0["learnmask_gates.heads.log_alpha"] > 0).float()
    assert torch.equal(handle.eval_masks()["heads"], kept)
    ids = torch.randint(5, 100, (2, 7))
    gated = plain(input_ids=ids).logits
    final = handle.finalize()
    assert set(final.state_dict()) <= base_keys
    assert torch.allclose(final(input_ids=ids).logits, gated, atol=1e-5)


@pytest.fixture(scope="module")
def grads_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("grads")
    done = torchrun(2, "ddp_grads_worker.py", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_closed_gates_raise_no_ddp_error_and_their_gradients_are_the_ranks_average(grads_run):
    tmp_path = grads_run
    for case in ("heads_closed", "heads_open"):
        first, second = (torch.load(tmp_path / f"{case}{r}.pt") for r in (0, 1))
        assert first["kept"][0].sum() == 3  # rank 0: CLS alone is open in each of its 3 examples
        assert second["kept"][0].sum() > 3
        for name, grad in first["ddp"].items():
            assert torch.equal(grad, second["ddp"][name]), name
            torch.testing.assert_close(grad, (first["local"][name] + second["local"][name]) / 2, rtol=0, atol=1e-7)
    open_scorer = "learnmask_tokens.scorers.0.linear.weight"
    second = torch.load(tmp_path / "heads_open1.pt")
    assert second["local"][open_scorer].abs().sum() > 0  # the scorer learns from rank 1's batch


@pytest.mark.slow
def test_a_world_size_that_does_not_divide_the_batch_fails_before_training(tmp_path):
    done = torchrun(2, "ddp_worker.py", str(tmp_path), json.dumps({**CONFIG, "batch_size": 5}))
    assert done.returncode != 0
    assert "batch_size 5 is the global batch, split evenly across 2 ranks" in done.stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_nccl_on_a_cpu_run_under_torchrun_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = torchrun(2, "ddp_worker.py", str(tmp_path), json.dumps({**CONFIG, "backend": "nccl"}))
    assert done.returncode != 0 and "nccl backend cannot run a model on cpu" in done.stderr


@pytest.mark.slow
def test_fisher_child_tuning_and_controllers_agree_across_ranks(grads_run):
    first, second = (torch.load(grads_run / f"rest{r}.pt") for r in (0, 1))
    for name, value in first["fisher"].items():  # averaged before any threshold: the mean of the ranks' own
        assert torch.equal(value, second["fisher"][name])
        torch.testing.assert_close(value, (first["fisher_alone"][name] + second["fisher_alone"][name]) / 2)
        assert not torch.equal(first["fisher_alone"][name], second["fisher_alone"][name])
    assert all(torch.equal(m, second["child_tuning"][k]) for k, m in first["child_tuning"].items())
    assert first["lagrangian"] == second["lagrangian"] and first["adaptive"] == second["adaptive"]
    one = __import__("learnmask").LagrangianController(0.5, lr=0.5)
    one.penalty(torch.tensor(0.4, dtype=torch.float64))  # the mean of the ranks' 0.2 and 0.6
    one.step()
    assert one.state_dict() == pytest.approx(first["lagrangian"], abs=1e-12)


@pytest.mark.slow
def test_a_token_pruning_cell_under_two_ranks_keeps_model_and_controllers_identical(tmp_path):
    """The token recipe (Lagrangian keep ratio plus the loss-adaptive target) on the tiny text task:
    each rank measures its own examples' keep ratio and loss, the controllers step on their mean."""
    done = torchrun(2, "ddp_tokens_worker.py", str(tmp_path), "gates_adaptive")
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = (torch.load(tmp_path / f"tokens{r}.pt", weights_only=False) for r in (0, 1))
    assert all(torch.equal(first["model"][k], second["model"][k]) for k in first["model"])
    assert set(first["controllers"]) == {"controller", "adaptive"}
    assert first["controllers"] == second["controllers"]
    for key in ("accuracy", "realized_keep_ratio", "export_max_logit_diff", "flop_reduction"):
        assert first["metrics"][key] == second["metrics"][key], key  # the same model evaluated alike
    assert first["metrics"]["keep_ratio_error"] <= 0.02 and first["metrics"]["export_max_logit_diff"] < 1e-4


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    first, second = _fit(tmp_path, 2, CONFIG, env={"NAN_AT": "2,1"})  # 16 steps: one skip allowed
    assert first["skipped"] == second["skipped"] == 1
    assert all(torch.equal(first["model"][k], second["model"][k]) for k in first["model"])
    assert first["controller"] == second["controller"]  # the multipliers did not move at the skipped step
    assert first["controller"]["step_count"] == second["controller"]["step_count"]


@pytest.mark.slow
def test_a_run_that_diverges_on_one_rank_fails_on_every_rank_without_hanging(tmp_path):
    done = torchrun(2, "ddp_worker.py", str(tmp_path), json.dumps({**CONFIG, "epochs": 1}), env={"NAN_AT": "2,1"})
    assert done.returncode != 0
    assert done.stderr.count("TrainingDiverged: 1 of 3 steps so far had a non-finite loss") == 2  # both ranks

"""GateCallback in a real Hugging Face Trainer, a few steps on a tiny BERT: the penalty enters the
loss, the controller steps once per optimizer step, gate logits get no weight decay and a constant
learning rate, and a resumed run restores the controller."""
import json

import pytest
import torch

pytest.importorskip("accelerate")
from conftest import tiny_bert  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import learnmask as lm  # noqa: E402
from learnmask.trainer_callback import CONTROLLER_FILE, OPTIMIZER_FILE  # noqa: E402


def _data(n=16):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (n, 8), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": int(i % 3)}
            for i in range(n)]


def _args(tmp_path, **options):
    values = dict(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
                  weight_decay=0.1, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                  disable_tqdm=True, seed=0)
    values.update(options)
    return TrainingArguments(**values)


def test_a_fixed_l0_penalty_closes_gates_through_the_trainers_loss(tmp_path):
    model = tiny_bert()
    handle = lm.apply_masks(model, heads=True, gate_options={"init_log_alpha": 1.0})
    before = handle.expected_unit_sparsity("heads").item()
    callback = lm.GateCallback(handle, lm.FixedPenalty(5.0), gate_lr=0.2)
    logged = []

    class Recorder(TrainerCallback):  # runs after GateCallback, sees what it added
        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.append(dict(logs))

    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_data(), callbacks=[callback, Recorder()])
    trainer.train()
    assert callback.controller.step_count == 6
    assert handle.expected_unit_sparsity("heads").item() > before + 0.05  # only the penalty pushes it up
    log_alpha = handle.gates["heads"].log_alpha
    assert not any(p is log_alpha for g in trainer.optimizer.param_groups for p in g["params"])
    (group,) = callback.optimizer.param_groups  # the gates' own AdamW: constant lr, no weight decay
    assert group["params"] == [log_alpha] and group["weight_decay"] == 0.0 and group["lr"] == 0.2
    assert log_alpha.requires_grad
    assert len(logged) == 7 and all(0.0 <= entry["learnmask/expected_sparsity"] <= 1.0 for entry in logged)
    assert all(entry["learnmask/penalty"] > 0 for entry in logged)
    assert not model._forward_hooks  # the loss hook is off after training


def test_without_the_penalty_the_gates_do_not_move_towards_sparsity(tmp_path):
    """The control experiment: same run, weight 0 (case G1: with weight 0 P(z != 0) does not move by L0)."""
    model = tiny_bert()
    handle = lm.apply_masks(model, heads=True, gate_options={"init_log_alpha": 1.0})
    before = handle.expected_unit_sparsity("heads").item()
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_data(),
                      callbacks=[lm.GateCallback(handle, lm.FixedPenalty(0.0), gate_lr=0.2)])
    trainer.train()
    assert abs(handle.expected_unit_sparsity("heads").item() - before) < 0.05


def test_lagrangian_controller_steps_after_each_optimizer_step_and_resumes(tmp_path):
    model = tiny_bert()
    handle = lm.apply_masks(model, heads=True)
    controller = lm.LagrangianController(lm.ConstantTarget(0.5), lr=0.5)
    args = _args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, gradient_accumulation_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=_data(), callbacks=[lm.GateCallback(handle, controller)])
    trainer.train()
    assert controller.step_count == 4  # optimizer steps, not micro-batches
    assert controller.state_dict()["lambda_1"] < 0  # dual ascent from s < t (case C1's sign)
    saved = json.loads((tmp_path / "checkpoint-2" / CONTROLLER_FILE).read_text())
    assert saved["step_count"] == 2
    gate_state = torch.load(tmp_path / "checkpoint-2" / OPTIMIZER_FILE, weights_only=True)
    assert gate_state["state"][0]["step"].item() == 2

    model2 = tiny_bert()
    handle2 = lm.apply_masks(model2, heads=True)
    resumed = lm.LagrangianController(lm.ConstantTarget(0.5), lr=0.5)
    restored = {}

    class Spy(lm.GateCallback):
        def on_train_begin(self, *a, **k):
            super().on_train_begin(*a, **k)
            restored.update(self.controller.state_dict())
            restored["gate_steps"] = self.optimizer.state_dict()["state"][0]["step"].item()

    trainer2 = Trainer(model=model2, args=_args(tmp_path, max_steps=4, save_strategy="no",
                                                gradient_accumulation_steps=2),
                       train_dataset=_data(), callbacks=[Spy(handle2, resumed)])
    trainer2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert restored == {**saved, "gate_steps": 2}
    assert resumed.step_count == 4


def test_a_callback_added_after_the_optimizer_exists_is_refused(tmp_path):
    model = tiny_bert()
    handle = lm.apply_masks(model, heads=True)
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=_data())
    trainer.add_callback(lm.GateCallback(handle, lm.FixedPenalty(1.0)))  # on_init_end never ran
    with pytest.raises(ValueError, match="the Trainer's optimizer holds the gate logits"):
        trainer.train()


def test_bad_arguments_are_clear_errors():
    handle = lm.apply_masks(tiny_bert(), heads=True)
    with pytest.raises(ValueError, match="sparsity='ffn' is not gated"):
        lm.GateCallback(handle, sparsity="ffn")
    with pytest.raises(ValueError, match="gate_lr must be a positive finite number"):
        lm.GateCallback(handle, gate_lr=float("nan"))


def test_the_expected_sparsity_and_the_controllers_numbers_reach_the_trainers_log_history(tmp_path):
    model = tiny_bert()
    handle = lm.apply_masks(model, heads=True)
    controller = lm.LagrangianController(lm.ConstantTarget(0.5), lr=0.5)
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=3), train_dataset=_data(),
                      callbacks=[lm.GateCallback(handle, controller)])
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [1, 2, 3]
    for entry in logged:
        assert 0.0 <= entry["learnmask/expected_sparsity"] <= 1.0
        assert entry["learnmask/target"] == 0.5 and "learnmask/lambda_1" in entry
    assert logged[-1]["learnmask/lambda_1"] == controller.state_dict()["lambda_1"]


def test_gate_samples_come_from_the_steps_generator_whatever_the_global_rng_did(tmp_path):
    """Under DDP every rank must draw the same gate samples although dropout advanced each rank's
    global RNG differently: the callback draws them from a generator of (args.seed, step)."""
    from learnmask.functional import hard_concrete_sample
    from learnmask.sampling import StepSampling

    model = tiny_bert()
    handle = lm.apply_masks(model, heads=True, gate_options={"init_log_alpha": 0.0})
    gate = handle.gates["heads"]
    seen = []

    def record(module, args):  # runs after learnmask's own pre-hook has drawn the step's sample
        if module.training:
            torch.rand(int(torch.randint(1, 50, ()).item()))  # another rank's dropout would advance the global RNG
            seen.append((gate.log_alpha.detach().clone(), handle.z["heads"].detach().clone()))

    model.register_forward_pre_hook(record)
    trainer = Trainer(model=model, args=_args(tmp_path, seed=7), train_dataset=_data(),
                      callbacks=[lm.GateCallback(handle, lm.FixedPenalty(1.0))])
    trainer.train()
    assert len(seen) == 6
    for step, (log_alpha, z) in enumerate(seen):
        expected = hard_concrete_sample(log_alpha, temperature=gate.temperature, stretch=gate.stretch,
                                        generator=StepSampling(7, step).generator("cpu"))
        assert torch.equal(z, expected), step

"""The classification recipe of one run: gates (as the run's mask table says) trained with the
model on the shared loop, evaluated with deterministic masks, finalized, measured.

Used by ``learnmask run`` and by the grid runner; returns a dict of metrics (no printing). A
run checkpoints at the end of every epoch into its folder and resumes from there; its
checkpoint is deleted only after its result is recorded (``fit(..., record=...)``).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import pathlib

import torch

from learnmask import distributed
from learnmask.data import load_dataset
from learnmask.gates import FixedGate, param_groups
from learnmask.inject import MaskHandle
from learnmask.io import atomic_torch_save, load_torch_file
from learnmask.recipe import gating
from learnmask.recipe.config import RunConfig
from learnmask.recipe.gating import Gating, keep_count, make_controller  # noqa: F401 (part of this module's API)
from learnmask.recipe.loop import Progress, TrainingLoop, warmup_linear_decay
from learnmask.recipe.mask_spec import MaskSpec
from learnmask.recipe.measure import accuracy_of, finalize_and_measure, logits_of, measure_dense
from learnmask.recipe.model import (
    EncodedTexts,
    accuracy,
    batches,
    bucketed_order,
    check_positions,
    encode,
    freeze_parameters,
    load_classifier,
)

logger = logging.getLogger(__name__)


def dense_twin(cfg: RunConfig) -> RunConfig:
    """The dense run whose fine-tuned weights ``importance`` starts from (same seed and data)."""
    return dataclasses.replace(cfg, method="dense", target_sparsity=0.0, masks={})


@dataclasses.dataclass
class Prepared:
    """Model, data and gates of one run, before training."""

    model: torch.nn.Module
    handle: MaskHandle | None
    train: EncodedTexts
    test: EncodedTexts
    pad_id: int
    epochs: int
    extra: dict
    spec: MaskSpec | None = None


def _load(cfg: RunConfig):
    torch.manual_seed(cfg.seed)  # the new classification head is drawn from this
    columns = {"text_column": cfg.text_column, "label_column": cfg.label_column} if cfg.dataset == "file" else {}
    data = load_dataset(cfg.dataset, cfg.dataset_path or None, test_size=cfg.test_size, **columns)
    tokenizer, model = load_classifier(cfg.model_path, data.num_labels)
    freeze_parameters(model, cfg.freeze)
    train = encode(tokenizer, data.train_texts, data.train_labels, cfg.max_length)
    if cfg.max_train_examples:
        train = EncodedTexts(train.input_ids[: cfg.max_train_examples], train.labels[: cfg.max_train_examples])
    test = encode(tokenizer, data.test_texts, data.test_labels, cfg.max_length)
    return model, train, test, tokenizer.pad_token_id


def prepare(cfg: RunConfig, cache_dir: pathlib.Path, progress: Progress | None = None) -> Prepared:
    """Load data and model and attach the gates that the run's mask table asks for.

    ``importance`` first needs its dense twin's weights: taken from ``cache_dir`` or made by
    running the dense twin (which stores them there).

    Raises:
        ValueError: ``max_length`` above the model's positions, and the loaders' errors.
    """
    model, train, test, pad_id = _load(cfg)
    check_positions(model, cfg.max_length)
    spec = cfg.mask_spec()
    if spec is None:
        return Prepared(model, None, train, test, pad_id, cfg.epochs, {})
    extra = {}
    if spec.gate == "importance":
        model.load_state_dict(dense_weights(dense_twin(cfg), cache_dir, progress))
    handle = gating.attach(cfg, model, spec)
    if spec.gate == "importance":
        scores = gating.importance(model, handle, train, pad_id, cfg.batch_size)
        for name, score in scores.items():
            handle.set_gate(name, FixedGate.from_scores(score, keep=keep_count(score.numel(), cfg.target_sparsity)))
        extra["accuracy_before_retraining"] = accuracy(model, test, pad_id)
        extra["importance"] = (scores["heads"].tolist() if list(scores) == ["heads"]
                               else {k: v.tolist() for k, v in scores.items()})
    epochs = cfg.importance_epochs if spec.gate == "importance" else cfg.epochs
    return Prepared(model, handle, train, test, pad_id, epochs, extra, spec)


def dense_weights(cfg: RunConfig, cache_dir: pathlib.Path, progress: Progress | None = None) -> dict:
    """Fine-tuned weights of a dense run, from ``cache_dir`` or by running it now (one process
    at a time: another one that needs the same weights waits for them; under DDP rank 0 holds
    the lock and decides, and every rank trains the dense run together)."""
    path = pathlib.Path(cache_dir) / f"dense-{cfg.key()}.pt"
    with distributed.exclusive(path):
        if distributed.broadcast_object(not path.exists()):
            fit(cfg, pathlib.Path(cache_dir) / f"run-{cfg.key()}", cache_dir=cache_dir, progress=progress)
    return load_torch_file(path, what="dense-weights cache")


class ClassifyTask:
    """The classification task of the shared loop: bucketed shuffled batches per epoch, the
    task loss plus the controller's penalty, the gates' schedule (see :class:`Gating`)."""

    log_every = 10

    def __init__(self, cfg: RunConfig, prepared: Prepared):
        self.cfg, self.p, self.model = cfg, prepared, prepared.model
        self.batch_size = cfg.batch_size
        self.steps_per_epoch = math.ceil(len(prepared.train) / cfg.batch_size)
        self.total_steps = prepared.epochs * self.steps_per_epoch
        self.gating = Gating(cfg, prepared.spec, prepared.handle, self.total_steps) if prepared.handle else None

    def batches(self, start: int):
        lengths = [len(ids) for ids in self.p.train.input_ids]
        for epoch in range(start // self.steps_per_epoch, self.p.epochs):
            generator = torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch)
            order = bucketed_order(lengths, self.cfg.batch_size, generator)
            skip = max(0, start - epoch * self.steps_per_epoch)
            for index, batch in enumerate(batches(self.p.train, order, self.cfg.batch_size, self.p.pad_id)):
                if index >= skip:
                    yield batch

    def before_step(self, step: int) -> None:
        if self.gating is not None:
            self.gating.before_step(step)

    def loss(self, batch: dict, step: int) -> tuple[torch.Tensor, float]:
        loss = self.engine(**batch).loss
        penalty = self.gating.penalty(step) if self.gating is not None else None
        return (loss if penalty is None else loss + penalty), loss.item()

    def after_step(self, step: int, task_loss: float, skipped: bool) -> None:
        if self.gating is not None:
            self.gating.after_step(step, skipped)

    def log(self, writer, step: int) -> None:
        if self.gating is not None:
            self.gating.log(writer, step)

    def checkpoint_due(self, steps_done: int) -> bool:
        return steps_done % self.steps_per_epoch == 0

    def state_dict(self) -> dict:
        return self.gating.state_dict() if self.gating is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.gating is not None:
            self.gating.load_state_dict(state)


class Trainer:
    """One classification run on the shared loop: AdamW (gates at their own constant learning
    rate, no decay), linear warm-up/decay restarted when learned gates are fixed, checkpoints."""

    def __init__(self, cfg: RunConfig, prepared: Prepared, run_dir: pathlib.Path):
        self.cfg, self.p = cfg, prepared
        self.task = ClassifyTask(cfg, prepared)
        self.gating = self.task.gating
        self.total_steps = self.task.total_steps
        self.fix_step = self.gating.fix_step if self.gating is not None else None
        groups = param_groups(prepared.model, lr=cfg.lr, weight_decay=cfg.weight_decay, gate_lr=cfg.gate_lr)
        lambdas = [self._base_lr] + [lambda _: 1.0] * (len(groups) - 1)
        self.loop = TrainingLoop(self.task, torch.optim.AdamW(groups), lambdas, run_dir, key=cfg.key(), seed=cfg.seed)

    @property
    def controller(self):
        return self.gating.controller if self.gating is not None else None

    def target(self, step: int) -> float:
        """Target sparsity at ``step`` (0 for a dense run)."""
        return self.gating.target(step) if self.gating is not None else 0.0

    @property
    def loss_history(self) -> list[float]:
        """Task loss of every step so far."""
        return self.loop.losses

    def _base_lr(self, step: int) -> float:
        """Linear warm-up then linear decay to 0, restarted at ``fix_step`` for learned gates.

        Learned gates train in two stages, as CoFi pruning does (Xia et al., 2022): gates and
        model together, then the model alone under the fixed mask, each with its own schedule.
        """
        start, end = 0, self.total_steps
        if self.fix_step is not None and self.fix_step < self.total_steps:
            start, end = (self.fix_step, self.total_steps) if step >= self.fix_step else (0, self.fix_step)
        return warmup_linear_decay(step, start, end, self.cfg.warmup_ratio)

    def run(self, progress: Progress | None = None) -> None:
        """Train from the last checkpoint (if any) to the end; checkpoint after every epoch."""
        self.loop.run(progress)

    def seconds(self) -> float:
        return self.loop.seconds()

    def final_metrics(self) -> dict:
        """Sizes and sparsity of the model as evaluated (gates fixed to their final units)."""
        epochs = self.cfg.total_epochs()
        if self.gating is None:
            dense = sum(p.numel() for p in self.p.model.parameters())
            return {"realized_sparsity": 0.0, "heads_kept": None, "heads_total": None, "parameters": dense,
                    "parameters_dense": dense, "epochs": epochs}
        self.gating.fix()
        return {**gating.gate_metrics(self.p.handle, self.p.spec), "epochs": epochs, **self.gating.control_metrics()}

    def finish(self, metrics: dict | None = None) -> None:
        """Log the final metrics, close TensorBoard and delete the checkpoint (record first)."""
        for name in ("accuracy", "realized_sparsity", "speedup", "control_final_error", "control_overshoot",
                     "control_tail_max_error", "control_oscillation_amplitude"):
            if metrics and metrics.get(name) is not None:
                self.loop.writer.add_scalar(f"final/{name}", metrics[name], self.loop.step)
        self.loop.finish()


def evaluate(prepared: Prepared, metrics: dict) -> dict:
    """Held-out accuracy with deterministic masks, then (gated runs) the finalized model checked
    and timed against the dense one; dense runs are timed alone."""
    logits = logits_of(prepared.model, prepared.test, prepared.pad_id)
    out = {"accuracy": accuracy_of(logits, prepared.test)}
    if prepared.handle is None:
        return {**out, **measure_dense(prepared.model, prepared.test, prepared.pad_id)}
    measured = finalize_and_measure(prepared.handle, prepared.model, prepared.test, prepared.pad_id, logits,
                                    metrics["parameters"])
    return {**out, **measured, "parameters": measured["finalized_parameters"]}


def fit(cfg: RunConfig, run_dir: pathlib.Path, *, cache_dir: pathlib.Path, progress: Progress | None = None,
        record=None) -> dict:
    """Run one config end to end and return its metrics.

    Args:
        record: called with the metrics once the run is done, before its checkpoint is
            deleted; if it raises, the checkpoint stays and a rerun records without training.

    Returns:
        dict with ``accuracy`` (held-out, deterministic masks, in [0, 1]), ``realized_sparsity``
        (in the mask table's measure), ``units_kept`` (name -> [kept, total]), ``heads_kept``,
        ``heads_total``, ``head_mask`` (gated heads), ``parameters`` (counted in the finalized
        model, checked equal to the gates' count) and ``parameters_dense``,
        ``finalized_accuracy``, ``speedup`` (finalized over dense examples/s, measured) and
        ``throughput``, ``epochs``, ``train_seconds``, per method extras
        (``accuracy_before_retraining`` for importance, controller numbers and trajectory).

    Raises:
        ValueError, FileNotFoundError: from the config, the data or the model loaders; an
            unreadable checkpoint; a diverged run (:class:`learnmask.recipe.loop.TrainingDiverged`);
            a finalized model that does not match (:class:`learnmask.recipe.measure.FinalizeMismatch`).
        OSError: from ``record`` or a checkpoint write.
    """
    run_dir, cache_dir = pathlib.Path(run_dir), pathlib.Path(cache_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    prepared = prepare(cfg, cache_dir, progress)
    trainer = Trainer(cfg, prepared, run_dir)

    def evaluate_and_record(metrics: dict) -> dict:  # rank 0 alone under DDP
        metrics.update(evaluate(prepared, metrics))
        if prepared.handle is None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(prepared.model.state_dict(), cache_dir / f"dense-{cfg.key()}.pt")
        if record is not None:
            record(metrics)
        return metrics

    try:
        trainer.run(progress)
        metrics = {"train_seconds": round(trainer.seconds(), 1), "skipped_steps": trainer.loop.skipped,
                   **prepared.extra, **trainer.final_metrics()}
        metrics = distributed.on_main(evaluate_and_record, metrics)
    except BaseException:
        trainer.loop.close()
        raise
    trainer.finish(metrics)
    return metrics

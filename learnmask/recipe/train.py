"""The fine-tuning recipe of one run: model and gates trained together, evaluated, measured.

Used by ``learnmask run`` and by the grid runner; returns a dict of metrics (no printing).
A run checkpoints at the end of every epoch into its folder and resumes from there.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import time
from typing import Protocol

import torch
from torch.utils.tensorboard import SummaryWriter

from learnmask.control import FixedPenalty, LagrangianController, PIController, control_metrics, make_schedule
from learnmask.data import load_dataset
from learnmask.gates import FixedGate, param_groups
from learnmask.inject import MaskHandle, apply_head_gates, find_layers
from learnmask.io import atomic_torch_save, load_torch_file
from learnmask.recipe.config import RunConfig
from learnmask.recipe.model import EncodedTexts, accuracy, batches, bucketed_order, encode, freeze_parameters, load_classifier

logger = logging.getLogger(__name__)


class Progress(Protocol):
    """What a run reports its steps to (a ``tqdm`` bar fits): ``update(n)``; ``total`` is set."""

    total: int | None

    def update(self, n: int = 1) -> object: ...


def keep_count(total: int, sparsity: float) -> int:
    """Units kept when a fraction ``sparsity`` in [0, 1) of ``total`` is removed (rounded)."""
    return total - round(sparsity * total)


def dense_twin(cfg: RunConfig) -> RunConfig:
    """The dense run whose fine-tuned weights ``importance`` starts from (same seed and data)."""
    return dataclasses.replace(cfg, method="dense", target_sparsity=0.0)


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


def head_importance(model, handle: MaskHandle, data: EncodedTexts, pad_id: int, batch_size: int) -> torch.Tensor:
    """Head importance of Michel, Levy & Neubig (2019), ``(L, H)``, each layer's row L2-normalised.

    ``I_h = sum over batches of |∂L/∂z_h|`` at the open gate ``z = 1`` in eval mode (per-batch
    absolute values, as in the authors' code), then divided by the layer's L2 norm.
    """
    model.eval()
    handle.capture_grad = True
    scores = torch.zeros_like(handle.gates["heads"].log_alpha, dtype=torch.float32)
    try:
        for batch in batches(data, list(range(len(data))), batch_size, pad_id):
            model(**batch).loss.backward()
            scores += handle.z["heads"].grad.abs()
    finally:
        handle.capture_grad = False
        model.zero_grad(set_to_none=True)
    return scores / scores.norm(dim=1, keepdim=True).clamp_min(1e-12)


def prepare(cfg: RunConfig, cache_dir: pathlib.Path, progress: Progress | None = None) -> Prepared:
    """Load data and model and attach the gates that ``cfg.method`` asks for.

    ``importance`` first needs its dense twin's weights: taken from ``cache_dir`` or made by
    running the dense twin (which stores them there).
    """
    model, train, test, pad_id = _load(cfg)
    if cfg.method == "dense":
        return Prepared(model, None, train, test, pad_id, cfg.epochs, {})
    layers = find_layers(model)
    shape = (len(layers), layers[0].attention.num_heads)
    keep = keep_count(shape[0] * shape[1], cfg.target_sparsity)
    extra = {}
    if cfg.method == "hard_concrete":
        handle = apply_head_gates(model, "hard_concrete", init_log_alpha=cfg.gate_init_log_alpha)
    elif cfg.method == "topk":
        handle = apply_head_gates(model, "topk")
    elif cfg.method == "random":
        generator = torch.Generator().manual_seed(cfg.seed)
        handle = apply_head_gates(model, FixedGate.random(shape, keep=keep, generator=generator))
    else:  # importance
        model.load_state_dict(dense_weights(dense_twin(cfg), cache_dir, progress))
        handle = apply_head_gates(model, FixedGate(torch.ones(shape)))
        scores = head_importance(model, handle, train, pad_id, cfg.batch_size)
        handle.set_gate("heads", FixedGate.from_scores(scores, keep=keep))
        extra["accuracy_before_retraining"] = accuracy(model, test, pad_id)
        extra["importance"] = scores.tolist()
    epochs = cfg.importance_epochs if cfg.method == "importance" else cfg.epochs
    return Prepared(model, handle, train, test, pad_id, epochs, extra)


def dense_weights(cfg: RunConfig, cache_dir: pathlib.Path, progress: Progress | None = None) -> dict:
    """Fine-tuned weights of a dense run, from ``cache_dir`` or by running it now."""
    path = pathlib.Path(cache_dir) / f"dense-{cfg.key()}.pt"
    if not path.exists():
        fit(cfg, pathlib.Path(cache_dir) / f"run-{cfg.key()}", cache_dir=cache_dir, progress=progress)
    return load_torch_file(path, what="dense-weights cache")


def fit(cfg: RunConfig, run_dir: pathlib.Path, *, cache_dir: pathlib.Path, progress: Progress | None = None) -> dict:
    """Run one config end to end and return its metrics.

    Returns:
        dict with ``accuracy`` (held-out, in [0, 1]), ``realized_sparsity`` (fraction of heads
        removed at evaluation), ``heads_kept``, ``heads_total``, ``parameters`` (remaining once
        closed heads are removed) and ``parameters_dense``, ``epochs``, ``train_seconds``, and
        per method extras (``accuracy_before_retraining`` for importance, final multipliers).

    Raises:
        ValueError, FileNotFoundError: from the config, the data or the model loaders.
    """
    run_dir, cache_dir = pathlib.Path(run_dir), pathlib.Path(cache_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    prepared = prepare(cfg, cache_dir, progress)
    trainer = Trainer(cfg, prepared, run_dir)
    trainer.run(progress)
    metrics = {"train_seconds": round(trainer.seconds(), 1), **prepared.extra, **trainer.final_metrics()}
    metrics["accuracy"] = accuracy(prepared.model, prepared.test, prepared.pad_id)
    if cfg.method == "dense":
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(prepared.model.state_dict(), cache_dir / f"dense-{cfg.key()}.pt")
    trainer.finish(metrics)
    return metrics


def make_controller(cfg: RunConfig, target):
    """The controller ``cfg.controller`` names, driving expected head sparsity to ``target(step)``."""
    if cfg.controller == "lagrangian":
        return LagrangianController(target, lr=cfg.controller_lr, damping=cfg.controller_damping)
    if cfg.controller == "pi":
        return PIController(target, kp=cfg.controller_kp, ki=cfg.controller_ki, damping=cfg.controller_damping)
    return FixedPenalty(cfg.l0_weight)


class Trainer:
    """The training loop of one run: AdamW, linear warm-up/decay, gates, controller, checkpoints."""

    def __init__(self, cfg: RunConfig, prepared: Prepared, run_dir: pathlib.Path):
        self.cfg, self.p, self.run_dir = cfg, prepared, run_dir
        self.steps_per_epoch = math.ceil(len(prepared.train) / cfg.batch_size)
        self.total_steps = prepared.epochs * self.steps_per_epoch
        learned = cfg.method in ("hard_concrete", "topk")
        self.fix_step = int(cfg.gate_phase * self.total_steps) if learned else None
        groups = param_groups(prepared.model, lr=cfg.lr, weight_decay=cfg.weight_decay, gate_lr=cfg.gate_lr)
        self.optimizer = torch.optim.AdamW(groups)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, [self._base_lr] + [lambda _: 1.0] * (len(groups) - 1))
        handle = prepared.handle
        self.heads_total = handle.gates["heads"].numel if handle else 0
        self.keep = keep_count(self.heads_total, cfg.target_sparsity)
        target = make_schedule(cfg.sparsity_schedule, cfg.target_sparsity, int(cfg.sparsity_warmup * self.total_steps))
        self.target = target
        self.controller = make_controller(cfg, target) if cfg.method == "hard_concrete" else None
        self.sparsity_history: list[float] = []  # expected sparsity and target while gates learn
        self.target_history: list[float] = []
        self.step = 0
        self.loss_history: list[float] = []  # task loss of every step run in this process
        self._seconds_before, self._started = 0.0, time.perf_counter()  # training time, across resumes
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def _base_lr(self, step: int) -> float:
        """Linear warm-up then linear decay to 0, restarted at ``fix_step`` for learned gates.

        Learned gates train in two stages, as CoFi pruning does (Xia et al., 2022): gates and
        model together, then the model alone under the fixed mask, each with its own schedule.
        """
        start, end = 0, self.total_steps
        if self.fix_step is not None and self.fix_step < self.total_steps:
            start, end = (self.fix_step, self.total_steps) if step >= self.fix_step else (0, self.fix_step)
        length = end - start
        warmup = max(1, int(self.cfg.warmup_ratio * length))
        local = step - start
        if local < warmup:
            return (local + 1) / warmup
        return max(0.0, (length - local) / max(1, length - warmup))

    @property
    def fixed(self) -> bool:
        """Whether the gates are past their learning phase (mask fixed to exactly ``keep`` heads)."""
        return self.fix_step is not None and self.step >= self.fix_step

    def _fix_mask(self) -> None:
        gate = self.p.handle.gates["heads"]
        if not isinstance(gate, FixedGate):
            self.p.handle.set_gate("heads", FixedGate(gate.deterministic_mask(self.keep).detach()))

    def _train_step(self, batch: dict) -> float:
        handle, model = self.p.handle, self.p.model
        if self.cfg.method == "topk" and not self.fixed:
            handle.gates["heads"].k = keep_count(self.heads_total, self.target(self.step))
        loss = model(**batch).loss
        task_loss = loss.item()
        if self.controller is not None and not self.fixed:
            sparsity = handle.expected_unit_sparsity("heads")
            loss = loss + self.controller.penalty(sparsity)
            self.sparsity_history.append(sparsity.item())
            self.target_history.append(self.target(self.step))
        if not torch.isfinite(loss):
            logger.warning("step %d: non-finite loss %s, step skipped", self.step, loss.item())
            self.optimizer.zero_grad(set_to_none=True)
            return task_loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.controller is not None and not self.fixed:
            self.controller.step()
        return task_loss

    def _log(self, task_loss: float) -> None:
        w, step = self.writer, self.step
        w.add_scalar("loss/task", task_loss, step)
        w.add_scalar("lr/base", self.scheduler.get_last_lr()[0], step)
        handle = self.p.handle
        if handle is None:
            return
        w.add_scalar("sparsity/expected", handle.expected_unit_sparsity("heads").item(), step)
        w.add_scalar("sparsity/target", self.target(step), step)
        if self.controller is not None and not self.fixed:  # multipliers, penalty, P/I terms
            for name, value in self.controller.last_metrics().items():
                if isinstance(value, (int, float)) and name not in ("target", "sparsity"):
                    w.add_scalar(f"controller/{name}", value, step)
        for layer, keep in enumerate(handle.keep_per_layer()):
            w.add_scalar(f"keep_ratio/layer_{layer}", keep, step)

    def run(self, progress: Progress | None = None) -> None:
        """Train from the last checkpoint (if any) to the end; checkpoint after every epoch."""
        self._resume()
        if progress is not None:
            if hasattr(progress, "reset"):  # tqdm: a new bar for this run's steps
                progress.reset(total=self.total_steps)
            else:
                progress.total = self.total_steps
            progress.update(self.step)
        model = self.p.model
        while self.step < self.total_steps:
            epoch = self.step // self.steps_per_epoch
            generator = torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch)
            order = bucketed_order([len(ids) for ids in self.p.train.input_ids], self.cfg.batch_size, generator)
            skip = self.step - epoch * self.steps_per_epoch
            model.train()
            for index, batch in enumerate(batches(self.p.train, order, self.cfg.batch_size, self.p.pad_id)):
                if index < skip:
                    continue
                if self.fixed:
                    self._fix_mask()
                task_loss = self._train_step(batch)
                self.loss_history.append(task_loss)
                if self.step % 10 == 0:
                    self._log(task_loss)
                self.step += 1
                if progress is not None:
                    progress.update(1)
            if self.fixed:
                self._fix_mask()
            self._checkpoint()

    def seconds(self) -> float:
        """Seconds spent training this run so far, summed over every process that worked on it."""
        return self._seconds_before + time.perf_counter() - self._started

    def _checkpoint(self) -> None:
        gate = self.p.handle.gates["heads"] if self.p.handle else None
        state = {
            "step": self.step,
            "model": self.p.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "controller": self.controller.state_dict() if self.controller else None,
            "history": (self.sparsity_history, self.target_history),
            "seconds": self.seconds(),
            "fixed_mask": gate.deterministic_mask().detach() if isinstance(gate, FixedGate) else None,
            "rng": torch.get_rng_state(),
            "key": self.cfg.key(),
        }
        atomic_torch_save(state, self.run_dir / "checkpoint.pt")

    def _resume(self) -> None:
        path = self.run_dir / "checkpoint.pt"
        if not path.exists():
            return
        state = load_torch_file(path, what="run checkpoint")
        if state["key"] != self.cfg.key():
            raise ValueError(f"{path} belongs to run {state['key']}, not {self.cfg.key()}; remove it or use another folder")
        if state["fixed_mask"] is not None:
            self.p.handle.set_gate("heads", FixedGate(state["fixed_mask"]))
        self.p.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])
        self.sparsity_history, self.target_history = (list(h) for h in state["history"])
        torch.set_rng_state(state["rng"])
        self.step = state["step"]
        self._seconds_before, self._started = state["seconds"], time.perf_counter()
        logger.info("resumed %s at step %d", self.run_dir, self.step)

    def final_metrics(self) -> dict:
        """Sparsity and size of the model as evaluated (deterministic mask, exactly ``keep`` heads)."""
        model, handle = self.p.model, self.p.handle
        dense = handle.dense_parameters() if handle else sum(p.numel() for p in model.parameters())
        if handle is None:
            return {"realized_sparsity": 0.0, "heads_kept": None, "heads_total": None,
                    "parameters": dense, "parameters_dense": dense, "epochs": self.cfg.total_epochs()}
        self._fix_mask()
        mask = handle.gates["heads"].deterministic_mask()
        kept = int((mask > 0).sum())
        metrics = {
            "realized_sparsity": 1 - kept / self.heads_total, "heads_kept": kept, "heads_total": self.heads_total,
            "parameters": handle.parameters_for({"heads": mask}),
            "parameters_dense": dense, "epochs": self.cfg.total_epochs(), "head_mask": mask.int().tolist(),
        }
        if self.controller is not None:
            metrics.update({f"controller_{k}": v for k, v in self.controller.last_metrics().items()})
            if self.sparsity_history:
                control = control_metrics(self.sparsity_history, self.target_history)
                metrics.update({f"control_{k}": v for k, v in control.items()})
                every = max(1, len(self.sparsity_history) // 100)  # about 100 points for figures
                metrics["trajectory"] = {"every": every, "sparsity": [round(x, 5) for x in self.sparsity_history[::every]],
                                         "target": [round(x, 5) for x in self.target_history[::every]]}
        return metrics

    def finish(self, metrics: dict) -> None:
        """Log the final metrics, close TensorBoard and drop the checkpoint (the run is done)."""
        for name in ("accuracy", "realized_sparsity", "control_final_error", "control_overshoot", "control_tail_max_error",
                     "control_oscillation_amplitude"):
            if metrics.get(name) is not None:
                self.writer.add_scalar(f"final/{name}", metrics[name], self.step)
        self.writer.close()
        (self.run_dir / "checkpoint.pt").unlink(missing_ok=True)

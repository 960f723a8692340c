"""The training loop every recipe shares: AdamW steps under a learning-rate schedule, a skip of
non-finite losses (and a failure when too many are skipped), TensorBoard scalars, progress,
checkpoints, and exact resume.

A recipe supplies a :class:`Task` (its batches, its loss, what happens after a step, its own
state); the loop owns the optimizer step, the schedule, the checkpoint file and the clock.

Checkpoints (``<run_dir>/checkpoint.pt``) hold what training can change — trainable parameters
and buffers, optimizer, schedule, torch RNG, the task's state — written atomically and read back
without pickle (:func:`learnmask.io.load_torch_file`). A run resumed from one ends bit-identical
to an uninterrupted run. The checkpoint outlives training: the caller deletes it with
:meth:`TrainingLoop.finish` once the run's result is recorded.
"""
from __future__ import annotations

import logging
import pathlib
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from learnmask.io import atomic_torch_save, load_torch_file, remove_stale_temporaries

logger = logging.getLogger(__name__)

#: A run fails once more than this fraction of its steps (at least one step, for runs under 10
#: steps: any) had a non-finite loss: such a run has diverged, and its numbers are no result.
MAX_SKIPPED_FRACTION = 0.1
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 2
_STATE_KEYS = {
    "format", "key", "step", "model", "optimizer", "scheduler", "task", "rng", "seconds", "losses", "skipped",
}


class TrainingDiverged(ValueError):
    """Too many steps of a run had a non-finite loss (see :data:`MAX_SKIPPED_FRACTION`)."""


class Progress(Protocol):
    """What a run reports its steps to (a ``tqdm`` bar fits): ``update(n)``; ``total`` is set."""

    total: int | None

    def update(self, n: int = 1) -> object: ...


class Task(Protocol):
    """What a recipe gives the loop.

    Attributes:
        model: the module trained (its trainable parameters and buffers are checkpointed).
        total_steps: optimizer steps of the whole run.
        log_every: TensorBoard scalars every this many steps.
    """

    model: nn.Module
    total_steps: int
    log_every: int

    def batches(self, start: int) -> Iterator[Any]:
        """The batches of steps ``start, start + 1, ..., total_steps - 1`` (a function of the step)."""

    def loss(self, batch: Any, step: int) -> tuple[Tensor, float]:
        """``(objective, task_loss)``: the scalar to minimise and the task loss for the logs."""

    def after_step(self, step: int, task_loss: float, skipped: bool) -> None:
        """Called after each step (``skipped``: non-finite objective, no update was made)."""

    def log(self, writer: Any, step: int) -> None:
        """Add the task's own TensorBoard scalars at ``step``."""

    def checkpoint_due(self, steps_done: int) -> bool:
        """Whether to checkpoint after ``steps_done`` steps (the loop also does at the end)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None:
        """Restore the task's state; called before the model's weights are loaded."""


def warmup_linear_decay(step: int, start: int, end: int, warmup_ratio: float) -> float:
    """Learning-rate factor at ``step`` of a phase ``[start, end)``: linear warm-up over
    ``warmup_ratio`` of it (at least one step), then linear decay to 0 at ``end``."""
    length = end - start
    warmup = max(1, int(warmup_ratio * length))
    local = step - start
    if local < warmup:
        return (local + 1) / warmup
    return max(0.0, (length - local) / max(1, length - warmup))


def start_progress(progress: Progress | None, total: int, done: int) -> None:
    """Point ``progress`` at a run of ``total`` steps of which ``done`` are done."""
    if progress is None:
        return
    if hasattr(progress, "reset"):  # tqdm: a new bar for this run's steps
        progress.reset(total=total)
    else:
        progress.total = total
    progress.update(done)


class TrainingLoop:
    """Runs a :class:`Task` from its last checkpoint to its last step.

    Args:
        task: the recipe's task.
        optimizer: the optimizer of the task's model.
        lr_lambdas: one ``step -> factor`` for every parameter group, or one for all.
        run_dir: the run's folder (checkpoint and ``tensorboard/``).
        key: the run's key; a checkpoint of another run is refused.
        max_skipped_fraction: see :data:`MAX_SKIPPED_FRACTION`.
    """

    def __init__(self, task: Task, optimizer: torch.optim.Optimizer, lr_lambdas: Callable | list[Callable],
                 run_dir: pathlib.Path, *, key: str, max_skipped_fraction: float = MAX_SKIPPED_FRACTION):
        from torch.utils.tensorboard import SummaryWriter

        self.task, self.optimizer, self.run_dir, self.key = task, optimizer, pathlib.Path(run_dir), key
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambdas)
        self.max_skipped_fraction = max_skipped_fraction
        self.step, self.skipped = 0, 0
        self.losses: list[float] = []  # task loss of every step, across resumes
        self._seconds_before, self._started = 0.0, time.perf_counter()
        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    @property
    def checkpoint_path(self) -> pathlib.Path:
        return self.run_dir / CHECKPOINT

    def seconds(self) -> float:
        """Seconds spent training this run so far, summed over every process that worked on it."""
        return self._seconds_before + time.perf_counter() - self._started

    def run(self, progress: Progress | None = None) -> None:
        """Train from the last checkpoint (if any) to ``task.total_steps``, checkpointing when the
        task says and at the end.

        Raises:
            ValueError: an unreadable checkpoint, or one of another run (the message names the
                file and says it can be deleted).
            TrainingDiverged: too many non-finite losses.
        """
        self.resume()
        total = self.task.total_steps
        start_progress(progress, total, self.step)
        if self.step >= total:
            return
        self.task.model.train()
        for batch in self.task.batches(self.step):
            self._step(batch)
            if progress is not None:
                progress.update(1)
            if self.step == total or self.task.checkpoint_due(self.step):
                self.save()

    def _step(self, batch: Any) -> None:
        objective, task_loss = self.task.loss(batch, self.step)
        skipped = not bool(torch.isfinite(objective))
        if skipped:
            self._skip(objective)
        else:
            objective.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # torch warns when the first step of a run is skipped
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()  # the schedule follows the step count, skipped or not
        self.task.after_step(self.step, task_loss, skipped)
        self.losses.append(task_loss)
        if self.step % self.task.log_every == 0:
            self.writer.add_scalar("loss/task", task_loss, self.step)
            self.writer.add_scalar("lr/base", self.scheduler.get_last_lr()[0], self.step)
            self.task.log(self.writer, self.step)
        self.step += 1

    def _skip(self, objective: Tensor) -> None:
        self.skipped += 1
        total = self.task.total_steps
        allowed = int(self.max_skipped_fraction * total)
        logger.warning("step %d: non-finite loss %s, step skipped (%d so far)",
                       self.step, objective.item(), self.skipped)
        if self.skipped > allowed:
            raise TrainingDiverged(
                f"{self.skipped} of {self.step + 1} steps so far had a non-finite loss (last: {objective.item()}); "
                f"a run may skip at most {self.max_skipped_fraction:.0%} of its {total} steps ({allowed}): "
                "it diverged and is not recorded. Lower lr or the controller's settings; "
                f"delete {self.run_dir} to start it over")

    def save(self) -> None:
        """Write the checkpoint atomically (a killed write leaves the previous one)."""
        model = self.task.model
        frozen = _frozen(model)
        weights = {name: value for name, value in model.state_dict().items() if name not in frozen}
        atomic_torch_save({
            "format": CHECKPOINT_FORMAT, "key": self.key, "step": self.step, "model": weights,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "task": self.task.state_dict(), "rng": torch.get_rng_state(), "seconds": self.seconds(),
            "losses": list(self.losses), "skipped": self.skipped,
        }, self.checkpoint_path)

    def resume(self) -> None:
        """Load the checkpoint if there is one (no-op otherwise); leftovers of killed writes go.

        Raises:
            ValueError: unreadable, of another learnmask version, or of another run.
        """
        path = self.checkpoint_path
        remove_stale_temporaries(path)
        if not path.exists():
            return
        state = load_torch_file(path, what="run checkpoint")
        restart = "delete it to restart the run from its first step"
        if not isinstance(state, dict) or set(state) != _STATE_KEYS or state["format"] != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a checkpoint this version of learnmask wrote; {restart}")
        if state["key"] != self.key:
            raise ValueError(f"{path} belongs to run {state['key']}, not {self.key}; {restart} or use another folder")
        try:
            self.task.load_state_dict(state["task"])
            self._load_weights(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise ValueError(
                f"{path} does not fit this run ({type(error).__name__}: {str(error)[:200]}); {restart}"
            ) from error
        self.step, self.skipped, self.losses = int(state["step"]), int(state["skipped"]), list(state["losses"])
        self._seconds_before, self._started = float(state["seconds"]), time.perf_counter()
        logger.info("resumed %s at step %d", self.run_dir, self.step)

    def _load_weights(self, weights: dict[str, Tensor]) -> None:
        model = self.task.model
        result = model.load_state_dict(weights, strict=False)
        missing = sorted(set(result.missing_keys) - _frozen(model))
        if result.unexpected_keys or missing:
            raise ValueError(f"weights missing {missing[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}")

    def close(self) -> None:
        """Close TensorBoard; the checkpoint stays (a failed or unrecorded run resumes from it)."""
        self.writer.close()

    def finish(self) -> None:
        """Close TensorBoard and delete the checkpoint: call once the run's result is recorded."""
        self.writer.close()
        self.checkpoint_path.unlink(missing_ok=True)


def _frozen(model: nn.Module) -> set[str]:
    """State-dict names of the parameters that do not train (tied names included): left out of
    checkpoints, since loading the run's model gives them again."""
    return {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}

"""The training loop every recipe shares: AdamW steps under a learning-rate schedule, a skip of
non-finite losses (and a failure when too many are skipped), TensorBoard scalars, progress,
checkpoints, exact resume, gradient accumulation, and DDP.

A recipe supplies a :class:`Task` (its batches, its loss, what happens after a step, its own
state); the loop owns the optimizer step, the schedule, the checkpoint file and the clock.

Checkpoints (``<run_dir>/checkpoint.pt``) hold what training can change — trainable parameters
and buffers, optimizer, schedule, torch RNG, the task's state — written atomically and read back
without pickle (:func:`learnmask.io.load_torch_file`). A run resumed from one ends bit-identical
to an uninterrupted run. The checkpoint outlives training: the caller deletes it with
:meth:`TrainingLoop.finish` once the run's result is recorded.

Random draws of masks and gates during a step come from generators seeded by the run's seed
(default: its key) and the step (:func:`learnmask.sampling.step_sampling`): the same after a
resume, on every DDP rank, and in a 1-process run.

**DDP.** In a process group of two or more ranks (``torchrun``; see
:mod:`learnmask.distributed`) the loop wraps the task's model in ``DistributedDataParallel``
with ``find_unused_parameters=False`` (re-wrapped whenever the set of trainable parameters
changes, as when learned gates are fixed), gives each rank its contiguous slice of every global
batch (weighting each rank's loss by its share, so that a short last batch still averages like
the 1-process run), skips a step on every rank when the loss is non-finite on any, averages the
task loss over ranks before the task and the logs see it, and lets rank 0 alone write the
checkpoint and TensorBoard (the others wait at a barrier; every rank resumes from the same
file). The batches themselves are the 1-process run's, a function of the step: a
``DistributedSampler`` would reorder them and break exact resume and the equivalence with one
process.
"""
from __future__ import annotations

import contextlib
import logging
import pathlib
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from learnmask import distributed
from learnmask.io import atomic_torch_save, load_torch_file, remove_stale_temporaries
from learnmask.sampling import step_sampling

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
        engine: what :meth:`loss` calls for the training forward; the loop sets it to the
            model's ``DistributedDataParallel`` wrapper under DDP and to ``model`` otherwise.
        total_steps: optimizer steps of the whole run.
        log_every: TensorBoard scalars every this many steps.
        batch_size: the global batch (optional; under DDP the loop refuses one that the world
            size does not divide, before any step).
    """

    model: nn.Module
    engine: nn.Module
    total_steps: int
    log_every: int

    def batches(self, start: int) -> Iterator[Any]:
        """The global batches of steps ``start, start + 1, ..., total_steps - 1`` (a function of the
        step); tensors (or mappings/sequences of them) with the examples along dim 0."""

    def loss(self, batch: Any, step: int) -> tuple[Tensor, float]:
        """``(objective, task_loss)``: the scalar to minimise and the task loss for the logs, as
        means over the examples of ``batch`` (a rank's slice, or a micro-batch, of a global
        batch); the forward goes through :attr:`engine`."""

    def after_step(self, step: int, task_loss: float, skipped: bool) -> None:
        """Called after each step (``skipped``: non-finite objective, no update was made)."""

    # optional: ``before_step(step)``, called before the step's batch is split and its forward
    # runs; where a task changes its trainable parameters (fixes learned gates), so that under
    # DDP the step runs with a wrapper built for them.

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
        seed: what seeds the step's mask and gate samples with the step
            (:mod:`learnmask.sampling`); default: ``key``. The recipes pass the run's seed, so
            that the rows of a table draw common random numbers (a preset and its mask table, or
            two targets, see the same gate noise).
        max_skipped_fraction: see :data:`MAX_SKIPPED_FRACTION`.
        accumulation_steps: micro-batches per optimizer step (each rank's slice of the global
            batch is cut into this many near-equal parts, their gradients summed with weights
            that give the slice's mean; under DDP all but the last under ``no_sync``), >= 1.

    Raises:
        ValueError: ``accumulation_steps`` not an int >= 1; under DDP a ``task.batch_size`` that
            the world size does not divide.
    """

    def __init__(self, task: Task, optimizer: torch.optim.Optimizer, lr_lambdas: Callable | list[Callable],
                 run_dir: pathlib.Path, *, key: str, max_skipped_fraction: float = MAX_SKIPPED_FRACTION,
                 accumulation_steps: int = 1, seed: object = None):
        from torch.utils.tensorboard import SummaryWriter

        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an int >= 1; got {accumulation_steps!r}")
        if distributed.world_size() > 1 and getattr(task, "batch_size", None) is not None:
            distributed.check_divisible(task.batch_size)  # before anything is written
        self.task, self.optimizer, self.run_dir, self.key = task, optimizer, pathlib.Path(run_dir), key
        self.seed = key if seed is None else seed
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambdas)
        self.max_skipped_fraction, self.accumulation_steps = max_skipped_fraction, accumulation_steps
        self.step, self.skipped = 0, 0
        self.losses: list[float] = []  # task loss of every step (mean over ranks), across resumes
        self._seconds_before, self._started = 0.0, time.perf_counter()
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard")) if self.rank == 0 else _NoWriter()
        self._wrapped: tuple[int, ...] | None = None  # ids of the parameters the DDP wrapper was built for
        task.engine = task.model

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

    def _engine(self) -> nn.Module:
        """The module the task's forward calls: the model, or its DDP wrapper (re-built when the
        trainable parameters changed since the last one was)."""
        model = self.task.model
        if self.world == 1:
            return model
        trainable = tuple(id(p) for p in model.parameters() if p.requires_grad)
        if trainable != self._wrapped:
            from torch.nn.parallel import DistributedDataParallel

            self.task.engine = None  # the old wrapper goes first (its hooks with it)
            self.task.engine = DistributedDataParallel(model, find_unused_parameters=False)
            self._wrapped = trainable
        return self.task.engine

    def _step(self, batch: Any) -> None:
        before = getattr(self.task, "before_step", None)
        if before is not None:
            before(self.step)
        if self.world > 1:
            batch, share = distributed.shard(batch, self.rank, self.world)
        else:
            share = 1.0
        engine = self._engine()
        pieces = distributed.split(batch, self.accumulation_steps)
        size = distributed.batch_size_of(batch)
        task_loss, skipped = 0.0, False
        for index, piece in enumerate(pieces):
            last = index == len(pieces) - 1
            sync = contextlib.nullcontext() if last or self.world == 1 else engine.no_sync()
            with sync, step_sampling(self.seed, self.step, self.rank, index):  # the same gate samples in every piece
                objective, piece_loss = self.task.loss(piece, self.step)
                if not distributed.all_true(bool(torch.isfinite(objective))):  # skip on every rank
                    skipped, task_loss = True, piece_loss
                    break
                weight = share * distributed.batch_size_of(piece) / size
                (objective if weight == 1.0 else objective * weight).backward()
            task_loss += piece_loss * weight
        if skipped:
            self._skip(objective)
        else:
            if self.world > 1:
                self._check_reduced()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        task_loss = distributed.mean(task_loss)
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

    def _check_reduced(self) -> None:
        """Under DDP after backward: every trainable parameter has its gradient, averaged over ranks.

        A parameter without one would leave DDP's reducer waiting (and the ranks apart); one whose
        set changed inside the step (the task fixed its gates in ``loss`` rather than in
        ``before_step``) was built into no wrapper's buckets, so this step's gradients are averaged
        here instead (averaging gradients already averaged changes nothing).

        Raises:
            RuntimeError: a trainable parameter got no gradient, named.
        """
        model = self.task.model
        trainable = [p for p in model.parameters() if p.requires_grad]
        unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
        if unused:
            raise RuntimeError(
                f"step {self.step}: {len(unused)} trainable parameter(s) got no gradient ({', '.join(unused[:5])}); "
                "under DDP (find_unused_parameters=False) every trainable parameter must take part in every step's "
                "loss: freeze the ones a step does not use (learnmask's closed gates multiply by zero and never skip "
                "a module)")
        if tuple(id(p) for p in trainable) != self._wrapped:
            for p in trainable:
                distributed.mean_(p.grad)

    def _skip(self, objective: Tensor) -> None:
        self.skipped += 1
        total = self.task.total_steps
        allowed = int(self.max_skipped_fraction * total)
        logger.warning("step %d: non-finite loss %s%s, step skipped (%d so far)", self.step, objective.item(),
                       " (here or on another rank)" if self.world > 1 else "", self.skipped)
        if self.skipped > allowed:
            raise TrainingDiverged(
                f"{self.skipped} of {self.step + 1} steps so far had a non-finite loss (last: {objective.item()}); "
                f"a run may skip at most {self.max_skipped_fraction:.0%} of its {total} steps ({allowed}): "
                "it diverged and is not recorded. Lower lr or the controller's settings; "
                f"delete {self.run_dir} to start it over")

    def save(self) -> None:
        """Write the checkpoint atomically (a killed write leaves the previous one); under DDP
        rank 0 writes it (with every rank's RNG state) while the others wait."""
        rng = torch.get_rng_state()
        if self.world > 1:
            states = [None] * self.world
            torch.distributed.all_gather_object(states, rng)
            rng = states
        if self.rank == 0:
            model = self.task.model
            frozen = _frozen(model)
            weights = {name: value for name, value in model.state_dict().items() if name not in frozen}
            atomic_torch_save({
                "format": CHECKPOINT_FORMAT, "key": self.key, "step": self.step, "model": weights,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "task": self.task.state_dict(), "rng": rng, "seconds": self.seconds(),
                "losses": list(self.losses), "skipped": self.skipped,
            }, self.checkpoint_path)
        distributed.barrier()

    def resume(self) -> None:
        """Load the checkpoint if there is one (no-op otherwise); leftovers of killed writes go.

        Raises:
            ValueError: unreadable, of another learnmask version, or of another run.
        """
        path = self.checkpoint_path
        if self.rank == 0:
            remove_stale_temporaries(path)
        distributed.barrier()
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
            torch.set_rng_state(self._own_rng(state["rng"]))
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise ValueError(
                f"{path} does not fit this run ({type(error).__name__}: {str(error)[:200]}); {restart}"
            ) from error
        self.step, self.skipped, self.losses = int(state["step"]), int(state["skipped"]), list(state["losses"])
        self._seconds_before, self._started = float(state["seconds"]), time.perf_counter()
        logger.info("resumed %s at step %d", self.run_dir, self.step)

    def _own_rng(self, saved: Tensor | list[Tensor]) -> Tensor:
        """This rank's global RNG state from a checkpoint's (one state, or one per rank)."""
        if isinstance(saved, Tensor):
            saved = [saved]
        if len(saved) != self.world:
            logger.warning("%s was written by %d rank(s) and resumes on %d: torch's global RNG (dropout) starts from "
                           "rank 0's state, so the run will not be bit-identical to an uninterrupted one",
                           self.checkpoint_path, len(saved), self.world)
            return saved[0]
        return saved[self.rank]

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
        """Close TensorBoard and delete the checkpoint (rank 0; every rank waits for it): call once
        the run's result is recorded."""
        self.writer.close()
        self.task.engine = self.task.model
        if self.rank == 0:
            self.checkpoint_path.unlink(missing_ok=True)
        distributed.barrier()


class _NoWriter:
    """TensorBoard's ``SummaryWriter`` on ranks other than 0: every method writes nothing."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None



def _frozen(model: nn.Module) -> set[str]:
    """State-dict names of the parameters that do not train (tied names included): left out of
    checkpoints, since loading the run's model gives them again."""
    return {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}

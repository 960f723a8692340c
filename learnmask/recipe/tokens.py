"""The token-pruning recipe (``recipe = "tokens"``, ``learnmask reproduce tokens``): one run of
:class:`~learnmask.recipe.token_config.TokenRunConfig` on the shared loop.

Every run starts from the task's dense weights (:func:`dense_weights`: the model trained with
every token, MiniLM fine-tuned or the ViT from scratch, cached per task, data and seed) and
trains ``prune_epochs`` more on the first ``prune_examples``: the ``full`` run (keep 1.0) with
every token, so it has had the same training steps as the pruned rows it is compared with; a
pruned run with token gates after the task's pruning layers (:func:`learnmask.apply_masks`
with ``tokens=True``) while the keep ratio moves from 1 to its target over ``keep_warmup`` of
the steps:

- ``gates``: hard-concrete gates on learned scorers; a Lagrangian controller drives the expected
  keep ratio to the moving target (``tokens.sparsity_target``); for the last ``hard_fraction``
  of the steps the gates keep exactly the top-k tokens of the learned scores, the eval rule
  (:meth:`~learnmask.inject.tokens.TokenGates.harden`; LTP's hard stage, Kim et al. 2022);
- ``gates_adaptive``: the same, but a :class:`~learnmask.control.LossAdaptiveController` moves
  the target from the task loss within ``[keep_ratio, 1]`` during the warm-up (fewer tokens
  while the batch loss stays within ``adaptive_tolerance`` of its running level, more when it
  rises above), then the target glides to ``keep_ratio`` at the controller's step;
- ``random`` / ``attention``: fixed scorers (:mod:`learnmask.recipe.token_baselines`) with the
  ``topk`` kind, so training already keeps exactly the tokens eval keeps.

Then: held-out accuracy with tokens dropped, the realized keep ratio, the export
(:meth:`~learnmask.inject.MaskHandle.export_token_pruning`, checked to predict as the gated
model does), FLOPs and measured throughput (:mod:`learnmask.recipe.token_measure`).
"""
from __future__ import annotations

import logging
import math
import pathlib

import torch
import torch.nn.functional as F

from learnmask import distributed
from learnmask.control import LagrangianController, LossAdaptiveController, control_metrics
from learnmask.gates import param_groups
from learnmask.inject import MaskHandle, apply_masks
from learnmask.io import atomic_torch_save, load_torch_file
from learnmask.recipe import token_measure as measure
from learnmask.recipe.loop import Progress, TrainingLoop, warmup_linear_decay
from learnmask.recipe.token_config import TokenRunConfig
from learnmask.recipe.token_tasks import Examples, TaskData, load_task, logits_of, token_layers

logger = logging.getLogger(__name__)
#: Examples whose kept tokens per pruning layer are recorded (for pictures).
PICTURED_EXAMPLES = 4


def attach_tokens(cfg: TokenRunConfig, model: torch.nn.Module) -> MaskHandle:
    """Token gates on ``model`` as ``cfg.method`` says (see the module)."""
    from learnmask.inject.architectures import find_layers
    from learnmask.recipe.token_baselines import AttentionReceivedScorer, RandomScorer

    learned = cfg.method in ("gates", "gates_adaptive")
    layers = token_layers(cfg)
    options = {"init_log_alpha": cfg.gate_init_log_alpha} if learned else {}
    handle = apply_masks(model, heads=False, tokens=True, token_layers=list(layers), token_keep_ratio=cfg.keep_ratio,
                         token_gate="hard_concrete" if learned else "topk", token_gate_options=options)
    if cfg.method == "random":
        for stage in range(len(layers)):
            handle.tokens.scorers[stage] = RandomScorer(cfg.seed * 1000 + stage)
    elif cfg.method == "attention":
        specs = find_layers(model)
        for stage, row in enumerate(layers):
            handle.tokens.scorers[stage] = AttentionReceivedScorer(specs[row + 1])
    return handle


class TokenTask:
    """The shared loop's task: shuffled batches, cross-entropy, and (pruned runs) the keep ratio
    schedule and the controllers.

    Args:
        heldout: examples on which the learned gates' expected keep ratio is measured when the
            hard stage begins (:func:`~learnmask.recipe.token_measure.heldout_expected_keep`).

    Attributes:
        total_steps: optimizer steps; the keep ratio reaches ``cfg.keep_ratio`` after
            ``ramp_steps`` of them; learned gates harden at ``hard_step``.
    """

    log_every = 10

    def __init__(self, cfg: TokenRunConfig, model: torch.nn.Module, handle: MaskHandle | None, train: Examples,
                 epochs: int, heldout: Examples | None = None):
        self.cfg, self.model, self.handle, self.train, self.epochs = cfg, model, handle, train, epochs
        self.batch_size = cfg.batch_size
        self.steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
        self.total_steps = epochs * self.steps_per_epoch
        self.ramp_steps = int(cfg.keep_warmup * self.total_steps)
        self.controller = self.adaptive = None
        self.expected_history: list[float] = []  # expected keep ratio and its target, every step
        self.target_history: list[float] = []
        self.adaptive_keep_at_pin: float | None = None
        self.heldout, self.heldout_keep = heldout, None
        learned = handle is not None and cfg.method in ("gates", "gates_adaptive")
        self.hard_step = max(self.ramp_steps, self.total_steps - round(cfg.hard_fraction * self.total_steps)) \
            if learned else None
        self.hardened = False
        if handle is None:
            return
        if cfg.method in ("gates", "gates_adaptive"):
            self.controller = LagrangianController(handle.tokens.sparsity_target, lr=cfg.controller_lr,
                                                   damping=cfg.controller_damping)
        if cfg.method == "gates_adaptive":
            step = cfg.adaptive_max_step or min(1.0, 2 * (1 - cfg.keep_ratio) / max(1, self.ramp_steps))
            self.adaptive = LossAdaptiveController(1.0, r_min=cfg.keep_ratio, r_max=1.0, harder="down", max_step=step,
                                                   tolerance=cfg.adaptive_tolerance)
        handle.tokens.keep_ratio = self.keep_at(0)

    def ramp_at(self, step: int) -> float:
        """The linear ramp: 1 - (1 - keep_ratio) * (step + 1) / ramp_steps, then ``keep_ratio``."""
        if step >= self.ramp_steps:
            return self.cfg.keep_ratio
        return 1.0 - (1.0 - self.cfg.keep_ratio) * (step + 1) / self.ramp_steps

    def keep_at(self, step: int) -> float:
        """Target keep ratio at ``step``: the linear ramp (:meth:`ramp_at`). The loss-adaptive
        row: the controller's value during the warm-up (with ``adaptive_within_ramp``, at most
        the ramp's: the controller's upper bound follows it), then a glide from there down to
        ``keep_ratio`` at the controller's step per update."""
        if self.adaptive is None:
            return self.ramp_at(step)
        if self.cfg.adaptive_within_ramp:  # (after the ramp: capped at keep_ratio, so no glide; also with no ramp)
            self.adaptive.cap(self.ramp_at(step))
        if step < self.ramp_steps:
            return self.adaptive.ratio
        return max(self.cfg.keep_ratio, self.adaptive.ratio - self.adaptive.max_step * (step - self.ramp_steps + 1))

    def batches(self, start: int):
        for epoch in range(start // self.steps_per_epoch, self.epochs):
            generator = torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch)
            order = torch.randperm(len(self.train), generator=generator).tolist()
            skip = max(0, start - epoch * self.steps_per_epoch)
            for index in range(skip, self.steps_per_epoch):
                yield self.train.batch(order[index * self.cfg.batch_size : (index + 1) * self.cfg.batch_size])

    def loss(self, batch: dict, step: int) -> tuple[torch.Tensor, float]:
        if self.handle is not None:
            keep = self.keep_at(step)  # (first: within the ramp it caps the controller at the deadline)
            if step == self.ramp_steps and self.adaptive is not None:
                self.adaptive_keep_at_pin = self.adaptive.ratio
            self.handle.tokens.keep_ratio = keep
            if self.hard_step is not None and step >= self.hard_step and not self.hardened:
                self._harden()
        labels = batch.pop("labels")
        loss = F.cross_entropy(self.engine(**batch).logits, labels)
        if self.handle is None:
            return loss, loss.item()
        expected = self.handle.expected_keep_ratio("tokens")
        self.expected_history.append(expected.item())
        self.target_history.append(self.handle.tokens.target_keep_ratio)
        if self.controller is None:
            return loss, loss.item()
        return loss + self.controller.penalty(1.0 - expected), loss.item()

    def _measure_heldout(self) -> None:
        if self.heldout is not None and self.heldout_keep is None:  # (restored after a resume past the hard step)
            training = self.model.training
            self.heldout_keep = measure.heldout_expected_keep(self.model, self.handle, self.heldout)
            self.model.train(training)

    def _harden(self) -> None:
        self._measure_heldout()
        self.handle.tokens.harden()
        self.hardened = True

    def after_step(self, step: int, task_loss: float, skipped: bool) -> None:
        if self.controller is not None and not skipped and not self.hardened:
            self.controller.step()
        if self.adaptive is not None and step < self.ramp_steps and not skipped:
            self.adaptive.update(task_loss)

    def log(self, writer, step: int) -> None:
        if self.expected_history:
            writer.add_scalar("tokens/expected_keep_ratio", self.expected_history[-1], step)
            writer.add_scalar("tokens/target_keep_ratio", self.target_history[-1], step)

    def checkpoint_due(self, steps_done: int) -> bool:
        return steps_done % self.steps_per_epoch == 0

    def state_dict(self) -> dict:
        return {"controller": self.controller.state_dict() if self.controller else None,
                "adaptive": self.adaptive.state_dict() if self.adaptive else None,
                "history": [list(self.expected_history), list(self.target_history)],
                "adaptive_keep_at_pin": self.adaptive_keep_at_pin, "heldout_keep": self.heldout_keep}

    def load_state_dict(self, state: dict) -> None:
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])
        if self.adaptive is not None:
            self.adaptive.load_state_dict(state["adaptive"])
        self.expected_history, self.target_history = (list(h) for h in state["history"])
        self.adaptive_keep_at_pin = state["adaptive_keep_at_pin"]
        self.heldout_keep = state.get("heldout_keep")

    def control(self) -> dict:
        """How the training-time expected keep ratio tracked its target (``control_*``), over the
        steps after the warm-up and before the hard stage (where it is exact by construction),
        the held-out expected keep ratio when the hard stage began, the training-time keep ratio's
        distance to its target at the last step (``final_keep_error``), and about 100 points of
        the trajectory."""
        if not self.expected_history:
            return {}
        end = self.hard_step if self.hard_step is not None else len(self.expected_history)
        after = slice(self.ramp_steps, end) if self.ramp_steps < end else slice(None, end or None)
        metrics = {f"control_{k}": v for k, v in
                   control_metrics(self.expected_history[after], self.target_history[after]).items()}
        every = max(1, len(self.expected_history) // 100)
        metrics["trajectory"] = {"every": every, "keep": [round(x, 5) for x in self.expected_history[::every]],
                                 "target": [round(x, 5) for x in self.target_history[::every]]}
        if self.adaptive is not None:
            metrics["adaptive_keep_at_pin"] = self.adaptive_keep_at_pin
        if self.hard_step is not None and not self.hardened:  # soft gates to the end: measured now
            self._measure_heldout()
        if self.heldout_keep is not None:
            metrics["heldout_expected_keep"] = self.heldout_keep
            metrics["heldout_expected_keep_error"] = abs(self.heldout_keep - self.handle.tokens.target_keep_ratio)
        metrics["hard_step"] = self.hard_step
        metrics["final_keep_error"] = abs(self.expected_history[-1] - self.target_history[-1])
        return metrics


def _optimizer(cfg: TokenRunConfig, task: TokenTask, run_dir: pathlib.Path, key: str, lr: float) -> TrainingLoop:
    groups = param_groups(task.model, lr=lr, weight_decay=cfg.weight_decay, gate_lr=cfg.gate_lr)
    base = lambda step: warmup_linear_decay(step, 0, task.total_steps, cfg.warmup_ratio)  # noqa: E731
    lambdas = [base] + [gate_rate(cfg.gate_warmup, task.total_steps)] * (len(groups) - 1)
    return TrainingLoop(task, torch.optim.AdamW(groups), lambdas, run_dir, key=key, seed=cfg.seed)


def gate_rate(warmup: float, total_steps: int):
    """The scorers' learning-rate factor at an optimizer step (0-based): ``(step + 1) / n``
    over the first ``n = round(warmup * total_steps)`` steps, then 1 (``warmup`` 0 or
    ``n <= 1``: 1 from the first step)."""
    n = round(warmup * total_steps)
    return lambda step: min(1.0, (step + 1) / n) if n > 1 else 1.0


def dense_path(cfg: TokenRunConfig, cache_dir: pathlib.Path) -> pathlib.Path:
    """Where :func:`dense_weights` caches the dense weights of ``cfg``'s task, data and seed."""
    return pathlib.Path(cache_dir) / f"dense-{cfg.dense_key()}.pt"


def dense_weights(cfg: TokenRunConfig, data: TaskData, cache_dir: pathlib.Path,
                  progress: Progress | None = None) -> dict:
    """The dense weights every run of ``cfg``'s task, data and seed starts from: its model
    trained ``epochs`` on ``train_examples`` with every token, from ``cache_dir`` or trained now
    on ``data`` (``load_task(cfg)``, its model untrained; one process at a time; resumable from
    ``cache_dir/run-<dense_key>``)."""
    cache_dir = pathlib.Path(cache_dir)
    key = cfg.dense_key()
    path = dense_path(cfg, cache_dir)
    with distributed.exclusive(path):  # under DDP: rank 0 locks and decides, every rank trains, rank 0 writes
        if distributed.broadcast_object(not path.exists()):
            task = TokenTask(cfg, data.model, None, data.train, cfg.epochs)
            loop = _optimizer(cfg, task, cache_dir / f"run-{key}", key, cfg.lr)
            try:
                loop.run(progress)
                distributed.on_main(atomic_torch_save, data.model.state_dict(), path)
            except BaseException:
                loop.close()
                raise
            loop.finish()
    return load_torch_file(path, what="dense-weights cache")


def _pictured(handle: MaskHandle, data: TaskData) -> dict:
    """What the first :data:`PICTURED_EXAMPLES` held-out examples kept (eval decisions):
    ``kept_tokens_pictured`` (per example, per pruning layer, the kept positions) and
    ``pictured_inputs`` (per example, its token strings, or its image as rows of 0-255 grey
    levels), drawn by :mod:`learnmask.recipe.token_pictures`."""
    test = data.test
    rows = list(range(min(PICTURED_EXAMPLES, len(test))))
    batch = test.batch(rows, labels=False)
    with torch.no_grad():
        handle.model.eval()
        handle.model(**batch)
    masks = handle.token_masks()
    positions = [[mask[row].nonzero().flatten().tolist() for mask in masks] for row in rows]
    if test.pad_id is not None:  # text: its word pieces (their ids when the task names none)
        inputs = [(data.token_names or (lambda ids: [str(i) for i in ids]))(list(test.inputs[row])) for row in rows]
    else:
        inputs = [(test.inputs[row, 0] * 255).round().to(torch.uint8).tolist() for row in rows]
    return {"kept_tokens_pictured": positions, "pictured_inputs": inputs}


def evaluate(cfg: TokenRunConfig, data: TaskData, handle: MaskHandle | None) -> dict:
    """Accuracy, realized keep ratio, FLOPs, the export's check and throughput (see the module)."""
    model, test = data.model, data.test
    labels = test.labels
    if handle is None:
        logits = logits_of(model, test)
        speed = measure.throughput({"full": model, "export": model}, test)
        return {"accuracy": float((logits.argmax(-1) == labels).float().mean()), "realized_keep_ratio": 1.0,
                "realized_keep_per_layer": [], "keep_ratio_error": 0.0, "flop_reduction": 0.0,
                "flop_reduction_after_first": 0.0, **measure.speed_metrics(speed, 0.0)}
    logits, kept = measure.gated_eval(model, handle, test)
    pictured = _pictured(handle, data)
    exported = handle.export_token_pruning()
    exported_logits = logits_of(exported, test)
    checked = measure.check_export(logits, exported_logits)
    ratios, layers = handle.tokens.ratios, handle.tokens.layers
    handle.remove()  # the same network with every token: the keep-1.0 reference it is timed against
    config = model.config
    flops = measure.flop_reduction(test.real_tokens(), ratios, layers, config.num_hidden_layers, config.hidden_size,
                                   config.intermediate_size)
    speed = measure.throughput({"full": model, "export": exported}, test)
    return {"accuracy": float((logits.argmax(-1) == labels).float().mean()),
            "export_accuracy": float((exported_logits.argmax(-1) == labels).float().mean()), **checked,
            "realized_keep_ratio": kept[-1], "realized_keep_per_layer": kept,
            "keep_ratio_error": abs(kept[-1] - cfg.keep_ratio), "token_layers": list(layers),
            **pictured, **flops, **measure.speed_metrics(speed, flops["flop_reduction"])}


def check_pruning_layers(cfg: TokenRunConfig, model: torch.nn.Module) -> None:
    """Raise ``ValueError`` when the run's pruning layers do not fit ``model`` (each < depth - 1)."""
    from learnmask.inject.architectures import find_layers

    layers, depth = token_layers(cfg), len(find_layers(model))
    if layers[-1] >= depth - 1:
        raise ValueError(f"token_layers {list(layers)}: the {cfg.task} model has {depth} layers, so tokens can be "
                         f"pruned after layers 0..{depth - 2} (some layer must run after pruning); got {layers[-1]}")


def fit_tokens(cfg: TokenRunConfig, run_dir: pathlib.Path, *, cache_dir: pathlib.Path,
               progress: Progress | None = None, record=None) -> dict:
    """Run one config end to end and return its metrics (the recipe's ``fit``; see
    :class:`~learnmask.recipe.registry.Recipe`).

    Returns:
        dict with ``accuracy`` (held-out, tokens dropped, in [0, 1]), ``realized_keep_ratio``
        (mean fraction of real tokens kept after the last pruning layer) and
        ``realized_keep_per_layer``, ``keep_ratio_error`` (its distance to ``keep_ratio``),
        ``flop_reduction`` and ``flop_reduction_after_first``, ``relative_throughput_b1`` /
        ``_b64`` (export over keep 1.0, examples/s), ``time_saved_b1`` / ``_b64``,
        ``time_saved_over_flops_b64``, ``throughput`` (absolute numbers), ``export_accuracy``
        and ``export_max_logit_diff``, ``control_*`` (training-time expected keep ratio vs
        target after the warm-up), ``heldout_expected_keep`` and its ``_error`` (learned gates:
        :func:`~learnmask.recipe.token_measure.heldout_expected_keep` against the target keep
        ratio, the mean over pruning layers), ``trajectory``, ``kept_tokens_pictured``, ``epochs``
        (dense and pruning phase), ``pictured_inputs``, ``train_seconds`` (pruning phase).

    Raises:
        FileNotFoundError: data or model not installed (the message says how to install them).
        ValueError: from the config, loaders or checkpoint; a diverged run
            (:class:`~learnmask.recipe.loop.TrainingDiverged`); an export that predicts otherwise
            (:class:`~learnmask.recipe.measure.FinalizeMismatch`).
    """
    run_dir, cache_dir = pathlib.Path(run_dir), pathlib.Path(cache_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = load_task(cfg)
    check_pruning_layers(cfg, data.model)  # before any training: the dense phase alone can take minutes
    data.model.load_state_dict(dense_weights(cfg, data, cache_dir, progress))
    handle = None if cfg.method == "full" else attach_tokens(cfg, data.model)
    task = TokenTask(cfg, data.model, handle, data.train.head(cfg.prune_examples), cfg.prune_epochs, data.test)
    loop = _optimizer(cfg, task, run_dir, cfg.key(), cfg.prune_lr or cfg.lr)
    try:
        loop.run(progress)
        metrics = {"train_seconds": round(loop.seconds(), 1), "skipped_steps": loop.skipped,
                   "epochs": cfg.epochs + cfg.prune_epochs, **task.control()}

        def evaluate_and_record(metrics: dict) -> dict:  # rank 0 alone under DDP (timings undisturbed)
            metrics.update(evaluate(cfg, data, handle))
            if record is not None:
                record(metrics)
            return metrics

        metrics = distributed.on_main(evaluate_and_record, metrics)
    except BaseException:
        loop.close()
        raise
    loop.finish()
    return metrics

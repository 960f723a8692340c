"""The continued-MLM recipe of one run: head warm-up (cached), training under a masking-rate
policy, evaluation on a fixed held-out set. Used by the grid runner (``recipe = "mlm"``).

The MLM head runs only at the N selected positions (gathered from the encoder's ``(B, L, H)``
output), not at all B·L: the same loss, and about ``1 / mlm_probability`` times less work in
the 30,522-way decoder, which dominates a MiniLM step on CPU otherwise.

Legend: B batch, L tokens per chunk, H hidden size, V vocabulary, N selected positions.
"""
from __future__ import annotations

import logging
import math
import os
import pathlib
import time

import torch

from learnmask import distributed
from learnmask.control import LossAdaptiveController, make_rate_schedule
from learnmask.io import atomic_torch_save, load_torch_file
from learnmask.masks.inputs import IGNORE_INDEX, MaskingVocab, mlm_loss
from learnmask.recipe.loop import TrainingLoop, warmup_linear_decay
from learnmask.recipe.mlm_config import MLMRunConfig
from learnmask.recipe.mlm_data import (
    Chunks,
    batch_indices,
    heldout_batch,
    mask_chunks,
    shakespeare_chunks,
    step_generator,
)
from learnmask.recipe.model import check_positions, default_model_path, freeze_parameters
from learnmask.sampling import derive_seed

logger = logging.getLogger(__name__)
HEAD_PREFIX = "cls.predictions."  # transform (dense + LayerNorm) and bias; the decoder weight is the word embedding


def load_masked_lm(model_path: str, seed: int):
    """Folder, tokenizer and ``AutoModelForMaskedLM`` from a local folder (never a hub).

    The MLM head's transform is drawn from ``torch.manual_seed(seed)`` when the checkpoint
    has none (all-MiniLM-L6-v2 ships only the encoder; its decoder is the tied embedding).

    Raises:
        FileNotFoundError: no ``config.json`` in the folder.
        ValueError: nothing loadable there.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = pathlib.Path(model_path) if model_path else default_model_path()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {folder}; expected a local Hugging Face model folder")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        model = transformers.AutoModelForMaskedLM.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"could not load a masked LM from {folder}: {error}") from error
    if not hasattr(model, "cls"):
        raise ValueError(f"the MLM recipe needs a BERT-style head (model.cls: transform + tied decoder); "
                         f"{folder} loads as {type(model).__name__}")
    return folder, tokenizer, model


def masked_lm_outputs(model, input_ids: torch.Tensor, labels: torch.Tensor, *, count_correct: bool = False):
    """Mean loss over the labelled positions (0.0 when none) and, if asked, the number
    predicted right (else ``None``).

    Args:
        model: a Hugging Face ``*ForMaskedLM`` with ``base_model`` and ``cls`` (BERT family).
        input_ids, labels: ``(B, L)`` chunks without padding (so no attention mask is built);
            labels ``-100`` where not predicted.
    """
    hidden = model.base_model(input_ids=input_ids).last_hidden_state
    selected = labels != IGNORE_INDEX
    logits = model.cls(hidden[selected])  # (N, V): the head at the selected positions only
    targets = labels[selected]
    correct = (logits.argmax(-1) == targets).sum() if count_correct else None
    return mlm_loss(logits, targets), correct


@torch.no_grad()
def evaluate_mlm(model, input_ids: torch.Tensor, labels: torch.Tensor, batch_size: int = 32) -> dict:
    """Held-out ``accuracy`` (argmax = original token, in [0, 1]) and ``loss`` (mean cross-entropy,
    nats) over all labelled positions, in eval mode; ``masked_tokens`` is their count."""
    model.eval()
    total, correct, count = 0.0, 0, 0
    for start in range(0, input_ids.shape[0], batch_size):
        ids, lab = input_ids[start : start + batch_size], labels[start : start + batch_size]
        n = int((lab != IGNORE_INDEX).sum())
        loss, right = masked_lm_outputs(model, ids, lab, count_correct=True)
        total, correct, count = total + loss.item() * n, correct + int(right), count + n
    return {"accuracy": correct / max(count, 1), "loss": total / max(count, 1), "masked_tokens": count}


def head_state(model) -> dict[str, torch.Tensor]:
    """The MLM head's own tensors (transform and bias), without the tied decoder weight."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if k.startswith(HEAD_PREFIX) and not k.endswith("decoder.weight")}


def log_unigram(train: Chunks, vocab: MaskingVocab) -> torch.Tensor:
    """``(V,)`` log relative frequency of each id in the training chunks (add-one smoothing;
    special ids counted as 0): the best bias of an MLM head whose hidden states say nothing."""
    counts = torch.bincount(train.input_ids.flatten(), minlength=vocab.vocab_size)[: vocab.vocab_size].double()
    counts[list(vocab.special_ids)] = 0
    return torch.log((counts + 1) / (counts + 1).sum()).float()


def warm_head(
    cfg: MLMRunConfig, model, vocab: MaskingVocab, train: Chunks, evaluation, cache_dir: pathlib.Path
) -> dict:
    """Train the MLM head alone at 15% (token masking) for ``head_warmup_steps``, cached per seed.

    The bias starts at the log unigram frequencies of the training text (:func:`log_unigram`);
    the encoder runs without gradients in eval mode; only the head's transform and bias learn
    (AdamW, ``head_lr``). The warmed head and the held-out scores after it ("before" the
    compared phase) are stored in ``cache_dir/mlm-head-<head_key>.pt`` and reused by every
    row with the same seed, so all rows start from identical weights.

    Returns:
        ``{"accuracy", "loss", "masked_tokens", "seconds"}`` on the held-out set after warm-up.
    """
    path = pathlib.Path(cache_dir) / f"mlm-head-{cfg.head_key()}.pt"
    if distributed.broadcast_object(path.exists()):  # under DDP: rank 0 decides, every rank warms up alike
        cached = load_torch_file(path, what="MLM head cache")
        unexpected = model.load_state_dict(cached["head"], strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"{path} holds {unexpected}, which {type(model).__name__} lacks; remove the cached head")
        return cached["metrics"]
    started = time.perf_counter()
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, p in model.named_parameters():  # no gradient for the tied decoder weight either
        p.requires_grad_(name.startswith(HEAD_PREFIX))
    with torch.no_grad():
        model.cls.predictions.bias.copy_(log_unigram(train, vocab))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.head_lr, weight_decay=0.0)
    model.eval()
    for step in range(cfg.head_warmup_steps):
        chosen = batch_indices(len(train), cfg.batch_size, step, cfg.seed, stream=1)
        ids, labels = mask_chunks("token", Chunks(train.input_ids[chosen], train.word_ids[chosen]), vocab, 0.15,
                                  step_generator(cfg.seed, step, stream=1))
        with torch.no_grad():
            hidden = model.base_model(input_ids=ids).last_hidden_state
        selected = labels != IGNORE_INDEX
        loss = mlm_loss(model.cls(hidden[selected]), labels[selected])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        p.requires_grad_(flags[name])
    metrics = {**evaluate_mlm(model, *evaluation), "seconds": round(time.perf_counter() - started, 1)}
    distributed.on_main(atomic_torch_save, {"head": head_state(model), "metrics": metrics}, path)
    return metrics


class RatePolicy:
    """The masking rate at each step: a schedule of the step, or a loss-adaptive controller.

    ``adaptive`` feeds every training loss to a :class:`LossAdaptiveController` with
    ``harder="up"``: the rate rises by ``adaptive_max_step`` while the loss stays at or below
    its running level (the model finds the task easy) and falls when the loss rises above it.
    """

    def __init__(self, cfg: MLMRunConfig):
        self.controller = None
        if cfg.schedule == "adaptive":
            self.controller = LossAdaptiveController(cfg.mlm_probability, r_min=cfg.rate_min, r_max=cfg.rate_max,
                                                     harder="up", ema=cfg.adaptive_ema,
                                                     tolerance=cfg.adaptive_tolerance,
                                                     max_step=cfg.adaptive_max_step)
        else:
            # reaches final_mlm_probability at the last step
            self.schedule = make_rate_schedule(cfg.schedule, cfg.mlm_probability, cfg.final_mlm_probability,
                                               cfg.steps - 1)

    def rate(self, step: int) -> float:
        """``mlm_probability`` for ``step``, in [0, 1]."""
        return self.controller.ratio if self.controller else self.schedule(step)

    def observe(self, loss: float) -> None:
        """Feed the training loss of the step just taken (schedules ignore it)."""
        if self.controller:
            self.controller.update(loss)

    def metrics(self) -> dict:
        """Controller numbers for logging (empty for schedules)."""
        return self.controller.last_metrics() if self.controller else {}

    def state_dict(self) -> dict | None:
        return self.controller.state_dict() if self.controller else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.controller:
            self.controller.load_state_dict(state)


class MLMTask:
    """The compared phase on the shared loop: masking at the policy's rate (masks and batches at
    step t depend only on ``(seed, t)``), TensorBoard scalars every step, a checkpoint every
    ``checkpoint_every`` steps; dropout draws from the torch RNG, which the loop checkpoints, so
    an interrupted run resumes to bit-identical results."""

    log_every = 1

    def __init__(self, cfg: MLMRunConfig, model, vocab: MaskingVocab, train: Chunks):
        self.cfg, self.model, self.vocab, self.train = cfg, model, vocab, train
        self.batch_size = cfg.batch_size
        self.total_steps = cfg.steps
        self.policy = RatePolicy(cfg)
        self.rates: list[float] = []
        self._rate = cfg.mlm_probability

    def batches(self, start: int):
        for step in range(start, self.cfg.steps):
            yield batch_indices(len(self.train), self.cfg.batch_size, step, self.cfg.seed)

    def loss(self, chosen: torch.Tensor, step: int) -> tuple[torch.Tensor, float]:
        self._rate = self.policy.rate(step)
        batch = Chunks(self.train.input_ids[chosen], self.train.word_ids[chosen])
        # each DDP rank masks its own chunks: its own stream (rank 0's is the single process's)
        rank = distributed.rank()
        generator = (step_generator(self.cfg.seed, step) if rank == 0
                     else torch.Generator().manual_seed(derive_seed(self.cfg.seed, step, "mlm masks", rank)))
        ids, labels = mask_chunks(self.cfg.strategy, batch, self.vocab, self._rate, generator)
        loss, _ = masked_lm_outputs(self.engine, ids, labels)
        return loss, loss.item()

    def after_step(self, step: int, task_loss: float, skipped: bool) -> None:
        self.policy.observe(task_loss)
        self.rates.append(self._rate)

    def log(self, writer, step: int) -> None:
        writer.add_scalar("mlm_probability", self.rates[-1], step)
        for name, value in self.policy.metrics().items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                writer.add_scalar(f"controller/{name}", value, step)

    def checkpoint_due(self, steps_done: int) -> bool:
        return steps_done % self.cfg.checkpoint_every == 0

    def state_dict(self) -> dict:
        return {"policy": self.policy.state_dict(), "rates": list(self.rates)}

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.rates = list(state["rates"])


def mlm_loop(cfg: MLMRunConfig, task: MLMTask, run_dir: pathlib.Path) -> TrainingLoop:
    """The shared loop for ``task``: AdamW (no decay on biases and LayerNorm weights), linear
    warm-up over ``warmup_ratio`` of the steps then linear decay to 0."""
    trainable = [(n, p) for n, p in task.model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.dim() >= 2]
    no_decay = [p for n, p in trainable if p.dim() < 2]  # biases and LayerNorm weights
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    return TrainingLoop(task, optimizer, lambda step: warmup_linear_decay(step, 0, cfg.steps, cfg.warmup_ratio),
                        run_dir, key=cfg.key(), seed=cfg.seed)


def fit_mlm(cfg: MLMRunConfig, run_dir: pathlib.Path, *, cache_dir: pathlib.Path, progress=None, record=None) -> dict:
    """Run one continued-MLM config end to end and return its metrics.

    ``record(metrics)``, if given, is called before the run's checkpoint is deleted (if it
    raises, the checkpoint stays and a rerun records without training again).

    Returns:
        ``heldout_accuracy`` (masked-token accuracy in [0, 1]) and ``heldout_loss`` (nats) on
        the fixed held-out set after training, the same ``*_before`` (after the head warm-up),
        ``final_mlm_probability`` and ``mean_mlm_probability`` (over the steps),
        ``train_loss_last`` (mean of the last 10% of steps), ``steps``, ``train_seconds``,
        ``head_warmup_seconds``, ``masked_tokens`` and ``mlm_probability_trajectory``.

    Raises:
        ValueError, FileNotFoundError: from the config, the data or the model loader; a
            ``max_length`` above the model's positions; an unreadable checkpoint; a diverged run.
        OSError: from ``record`` or a checkpoint write.
    """
    run_dir, cache_dir = pathlib.Path(run_dir), pathlib.Path(cache_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    folder, tokenizer, model = load_masked_lm(cfg.model_path, cfg.seed)
    check_positions(model, cfg.max_length)
    vocab = MaskingVocab.from_tokenizer(tokenizer)
    train, heldout = shakespeare_chunks(str(folder), cfg.max_length, cfg.heldout_plays)
    evaluation = heldout_batch(heldout, vocab, count=cfg.eval_chunks, rate=cfg.eval_mlm_probability, seed=cfg.eval_seed)
    before = warm_head(cfg, model, vocab, train, evaluation, cache_dir)
    freeze_parameters(model, cfg.freeze)
    torch.manual_seed(cfg.seed)  # dropout stream of the compared phase, the same whether the head was cached or not
    task = MLMTask(cfg, model, vocab, train)
    loop = mlm_loop(cfg, task, run_dir)
    try:
        loop.run(progress)
        def evaluate_and_record() -> dict:  # rank 0 alone under DDP
            metrics = _metrics(cfg, evaluate_mlm(model, *evaluation), before, task.rates, loop)
            if record is not None:
                record(metrics)
            return metrics

        metrics = distributed.on_main(evaluate_and_record)
    except BaseException:
        loop.close()
        raise
    for name in ("heldout_accuracy", "heldout_loss"):
        loop.writer.add_scalar(f"final/{name}", metrics[name], loop.step)
    loop.finish()
    return metrics


def _metrics(cfg: MLMRunConfig, after: dict, before: dict, rates: list[float], loop: TrainingLoop) -> dict:
    losses = loop.losses
    every = max(1, len(rates) // 100)
    tail = losses[-max(1, len(losses) // 10):]
    return {
        "heldout_accuracy": after["accuracy"], "heldout_loss": after["loss"], "masked_tokens": after["masked_tokens"],
        "heldout_accuracy_before": before["accuracy"], "heldout_loss_before": before["loss"],
        "final_mlm_probability": rates[-1], "mean_mlm_probability": sum(rates) / len(rates),
        "train_loss_last": sum(tail) / len(tail), "steps": cfg.steps, "train_seconds": round(loop.seconds(), 1),
        "skipped_steps": loop.skipped,
        "head_warmup_seconds": before["seconds"],
        "mlm_probability_trajectory": {"every": every, "rate": [round(r, 5) for r in rates[::every]],
                                       "loss": [round(x, 4) for x in losses[::every]]},
    }

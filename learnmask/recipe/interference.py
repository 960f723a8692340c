"""The interference recipe (``recipe = "interference"``, ``learnmask reproduce interference``):
does masking what a model may change reduce forgetting? One run of
:class:`~learnmask.recipe.interference_config.InterferenceRunConfig` on the shared loop.

1. Task A: all-MiniLM-L6-v2 with a new 6-way head fully fine-tuned on TREC-6 questions
   (cached per seed and settings: every cell of a seed starts from the same model), then
   measured: task-A held-out accuracy with its head, and a linear probe fitted on the frozen
   encoder's features (the pooled CLS vector; multinomial logistic regression).
2. Task B: task A's head is set aside, a new 2-way head put on, and the model fine-tuned on
   Rotten Tomatoes fresh/rotten snippets under the run's method
   (:mod:`learnmask.recipe.interference_methods`).
3. Measured: task-B held-out accuracy; task A again with its own head put back ("head kept"),
   and with the probe fitted again on the new features ("probe re-fit"; Tao et al., 2023:
   forgetting of the head vs of the features); the fraction of the encoder's entries whose
   value differs from task A's weights (by diffing the plain weights, not by mask density).
   Per-example correctness is recorded for paired tests.
"""
from __future__ import annotations

import logging
import math
import pathlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learnmask import distributed
from learnmask.io import atomic_torch_save, load_torch_file
from learnmask.recipe.interference_config import InterferenceRunConfig
from learnmask.recipe.interference_methods import Method, encoder_names
from learnmask.recipe.loop import Progress, TrainingLoop, warmup_linear_decay
from learnmask.recipe.measure import logits_of
from learnmask.recipe.model import EncodedTexts, batches, bucketed_order, check_positions, encode, load_classifier

logger = logging.getLogger(__name__)
#: L2 penalty of the linear probe, per unit of the standardized features' squared weights.
PROBE_L2 = 1e-3
PROBE_ITERATIONS = 200
#: A training phase checkpoints every this many steps (and at its end).
CHECKPOINT_EVERY = 50


class Data:
    """Tokenized task A (TREC-6) and task B (Rotten Tomatoes) with the model and tokenizer."""

    def __init__(self, cfg: InterferenceRunConfig):
        from learnmask.data import load_rotten_tomatoes, load_trec

        a = load_trec(cfg.a_path or None, test_size=cfg.a_test_examples, seed=0)
        b = load_rotten_tomatoes(cfg.b_path or None, test_size=cfg.b_test_examples, seed=0)
        torch.manual_seed(cfg.seed)
        self.tokenizer, self.model = load_classifier(cfg.model_path or None, a.num_labels)
        check_positions(self.model, max(cfg.a_max_length, cfg.b_max_length))
        self.pad_id = self.tokenizer.pad_token_id
        self.a_train = _head(encode(self.tokenizer, a.train_texts, a.train_labels, cfg.a_max_length),
                             cfg.a_train_examples)
        self.a_test = encode(self.tokenizer, a.test_texts, a.test_labels, cfg.a_max_length)
        self.b_train = _head(encode(self.tokenizer, b.train_texts, b.train_labels, cfg.b_max_length),
                             cfg.b_train_examples)
        self.b_test = encode(self.tokenizer, b.test_texts, b.test_labels, cfg.b_max_length)
        self.a_labels, self.b_labels = a.num_labels, b.num_labels


def _head(data: EncodedTexts, count: int) -> EncodedTexts:
    """The first ``count`` examples (0 = all)."""
    if not count or count >= len(data):
        return data
    return EncodedTexts(data.input_ids[:count], data.labels[:count])


class PhaseTask:
    """The shared loop's task for one training phase: bucketed shuffled batches of ``data``
    (global steps ``offset .. offset + total_steps - 1`` of an ``epochs``-pass schedule),
    cross-entropy, and the method's penalty and hooks."""

    log_every = 10

    def __init__(self, model: nn.Module, data: EncodedTexts, *, batch_size: int, pad_id: int, seed: int,
                 epochs: int, offset: int = 0, steps: int | None = None, method: Method | None = None):
        self.model, self.data, self.batch_size, self.pad_id, self.seed = model, data, batch_size, pad_id, seed
        self.steps_per_epoch = math.ceil(len(data) / batch_size)
        self.offset = offset
        self.total_steps = steps if steps is not None else epochs * self.steps_per_epoch - offset
        self.method = method
        self.density: list[float] = []

    def batches(self, start: int):
        lengths = [len(ids) for ids in self.data.input_ids]
        first = self.offset + start
        for epoch in range(first // self.steps_per_epoch, math.ceil((self.offset + self.total_steps)
                                                                    / self.steps_per_epoch)):
            order = bucketed_order(lengths, self.batch_size, torch.Generator().manual_seed(self.seed * 1000 + epoch))
            for index, batch in enumerate(batches(self.data, order, self.batch_size, self.pad_id)):
                step = epoch * self.steps_per_epoch + index
                if first <= step < self.offset + self.total_steps:
                    yield batch

    def loss(self, batch: dict, step: int) -> tuple[Tensor, float]:
        labels = batch.pop("labels")
        loss = F.cross_entropy(self.engine(**batch).logits, labels)
        penalty = self.method.penalty() if self.method is not None else None
        if penalty is None:
            return loss, loss.item()
        return loss + penalty, loss.item()

    def after_step(self, step: int, task_loss: float, skipped: bool) -> None:
        if self.method is not None:
            self.method.after_step(skipped)
            density = self.method.expected_density()
            if density is not None:
                self.density.append(density)

    def log(self, writer, step: int) -> None:
        if self.density:
            writer.add_scalar("diff_masks/expected_density", self.density[-1], step)

    def checkpoint_due(self, steps_done: int) -> bool:
        return steps_done % CHECKPOINT_EVERY == 0

    def state_dict(self) -> dict:
        return {"method": self.method.state_dict() if self.method is not None else None,
                "density": list(self.density)}

    def load_state_dict(self, state: dict) -> None:
        if self.method is not None:
            self.method.load_state_dict(state["method"])
        self.density = list(state["density"])


def _loop(task: PhaseTask, groups: list[dict], run_dir: pathlib.Path, key: str, warmup_ratio: float) -> TrainingLoop:
    """AdamW over ``groups``; every group but ``"masks"`` warms up and decays linearly."""
    decay = lambda step: warmup_linear_decay(step, 0, task.total_steps, warmup_ratio)  # noqa: E731
    lambdas = [(lambda _: 1.0) if g["name"] == "masks" else decay for g in groups]
    return TrainingLoop(task, torch.optim.AdamW(groups), lambdas, run_dir, key=key)


def _run(loop: TrainingLoop, progress: Progress | None) -> None:
    try:
        loop.run(progress)
    except BaseException:
        loop.close()
        raise


def predictions(model: nn.Module, data: EncodedTexts, pad_id: int) -> list[int]:
    """Per example 1 if ``model`` (eval mode) classifies it right, else 0."""
    return (logits_of(model, data, pad_id).argmax(-1) == torch.tensor(data.labels)).int().tolist()


@torch.no_grad()
def features(model: nn.Module, data: EncodedTexts, pad_id: int, batch_size: int = 128) -> Tensor:
    """``(N, d)`` the encoder's pooled features (the classifier head's input), eval mode, float64."""
    model.eval()
    out = []
    for batch in batches(data, list(range(len(data))), batch_size, pad_id):
        batch.pop("labels")
        out.append(model.bert(**batch).pooler_output.double())
    return torch.cat(out)


def probe_correct(train: Tensor, train_labels: list[int], test: Tensor, test_labels: list[int],
                  classes: int) -> list[int]:
    """A linear probe (multinomial logistic regression, L2 :data:`PROBE_L2`, L-BFGS) fitted on
    standardized ``train`` features ``(N, d)``; per ``test`` example 1 if it is classified
    right. Deterministic (float64, full batch, zero init)."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-8)
    x, x_test = (train - mean) / std, (test - mean) / std
    y = torch.tensor(train_labels)
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=PROBE_ITERATIONS, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + PROBE_L2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return ((x_test @ weight + bias).argmax(-1) == torch.tensor(test_labels)).int().tolist()


def task_a_measures(model: nn.Module, data: Data, cfg: InterferenceRunConfig) -> dict:
    """Task A with its own head (``model.classifier``) and with a probe fitted on the features."""
    head = predictions(model, data.a_test, data.pad_id)
    probe_train = _head(data.a_train, cfg.probe_examples)
    probe = probe_correct(features(model, probe_train, data.pad_id), probe_train.labels,
                          features(model, data.a_test, data.pad_id), data.a_test.labels, data.a_labels)
    return {"head": head, "probe": probe}


def task_a_model(cfg: InterferenceRunConfig, data: Data, cache_dir: pathlib.Path,
                 progress: Progress | None = None) -> dict:
    """Task A's fine-tuned weights and measures (``{"weights", "head", "probe"}``), from
    ``cache_dir`` or trained now on ``data.model`` (one process at a time; resumable)."""
    key = cfg.task_a_key()
    path = pathlib.Path(cache_dir) / f"task-a-{key}.pt"
    with distributed.exclusive(path):  # under DDP: rank 0 locks and decides, every rank trains, rank 0 writes
        if distributed.broadcast_object(not path.exists()):
            model = data.model
            task = PhaseTask(model, data.a_train, batch_size=cfg.batch_size, pad_id=data.pad_id, seed=cfg.seed,
                             epochs=cfg.a_epochs)
            groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.a_lr,
                       "weight_decay": cfg.weight_decay, "name": "base"}]
            loop = _loop(task, groups, path.parent / f"run-task-a-{key}", key, cfg.warmup_ratio)
            _run(loop, progress)
            measures = task_a_measures(model, data, cfg)
            distributed.on_main(atomic_torch_save, {"weights": model.state_dict(), **measures}, path)
            loop.finish()
    return load_torch_file(path, what="task-A model cache")


def _new_head(model: nn.Module, classes: int, seed: int) -> nn.Linear:
    """Task B's head: a ``Linear`` like task A's with ``classes`` outputs, N(0, initializer_range)
    weights (as transformers initializes it) and zero bias, seeded."""
    old = model.classifier
    head = nn.Linear(old.in_features, classes, dtype=old.weight.dtype)
    generator = torch.Generator().manual_seed(seed * 1000 + 3)
    with torch.no_grad():
        head.weight.normal_(0.0, getattr(model.config, "initializer_range", 0.02), generator=generator)
        head.bias.zero_()
    return head


def changed_entries(before: dict[str, Tensor], after: dict[str, Tensor], names: list[str]) -> int:
    """How many entries of the parameters ``names`` differ (``!=``) between two state dicts."""
    return sum(int((before[n] != after[n]).sum()) for n in names)


def fit_interference(cfg: InterferenceRunConfig, run_dir: pathlib.Path, *, cache_dir: pathlib.Path,
                     progress: Progress | None = None, record=None) -> dict:
    """Run one config end to end and return its metrics (the recipe's ``fit``; see
    :class:`~learnmask.recipe.registry.Recipe`).

    Returns:
        dict with ``b_accuracy`` and ``b_correct`` (task B held out, in [0, 1], and per example
        0/1); ``a_accuracy_before`` / ``a_accuracy_head`` and ``a_correct_head`` (task A with
        its own head, before and after task B); ``a_probe_before`` / ``a_probe_after`` and
        ``a_probe_correct`` (a probe fitted on the features); ``fraction_changed``,
        ``changed_parameters``, ``encoder_parameters`` (encoder entries that differ from task
        A's weights); ``mask_density``; ``train_seconds`` (task B), ``epochs`` (task B),
        ``diff_density_trajectory`` (diff masks: ``{"every": k, "density": [...]}``, the
        expected density every k-th step, about 100 points: stage (a), then the fixed mask's).

    Raises:
        FileNotFoundError: data or model not installed (the message says how to install them).
        ValueError: from the config, loaders or checkpoints; a diverged run.
    """
    run_dir, cache_dir = pathlib.Path(run_dir), pathlib.Path(cache_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = Data(cfg)
    model = data.model
    task_a = task_a_model(cfg, data, cache_dir, progress)
    model.load_state_dict(task_a["weights"])
    # task B's randomness (dropout, gate samples) must not depend on whether task A was trained in
    # this process or read from the cache
    torch.manual_seed(cfg.seed * 1000 + 11)
    head_a = model.classifier
    model.classifier = _new_head(model, data.b_labels, cfg.seed)
    names = encoder_names(model)
    before = {n: task_a["weights"][n] for n in names}

    def fisher_batches(size: int):
        order = torch.randperm(len(data.b_train), generator=torch.Generator().manual_seed(cfg.seed * 1000 + 5))
        return batches(data.b_train, order.tolist(), size, data.pad_id)

    method = Method(cfg, model, fisher_batches)
    steps = cfg.b_epochs * math.ceil(len(data.b_train) / cfg.batch_size)
    fixed = round(cfg.diff_fixed_fraction * steps) if method.stages == 2 else 0
    phases = [(0, steps - fixed)] + ([(steps - fixed, fixed)] if fixed else [])
    loops, seconds, density = [], 0.0, []
    for stage, (offset, length) in enumerate(phases):
        method.start(stage, length)
        task = PhaseTask(model, data.b_train, batch_size=cfg.batch_size, pad_id=data.pad_id, seed=cfg.seed + 1,
                         epochs=cfg.b_epochs, offset=offset, steps=length, method=method)
        loop = _loop(task, method.groups(stage), run_dir / f"stage-{stage}", f"{cfg.key()}-{stage}",
                     cfg.warmup_ratio)
        method.attach(loop.optimizer)
        _run(loop, progress)
        loops.append(loop)
        seconds += loop.seconds()
        density += task.density
    def evaluate_and_record() -> dict:  # rank 0 alone under DDP
        b_correct = predictions(model, data.b_test, data.pad_id)
        after = method.plain_weights()
        changed = changed_entries(before, after, names)
        total = sum(before[n].numel() for n in names)
        model.classifier = head_a
        after_a = task_a_measures(model, data, cfg)
        metrics = {
            "b_accuracy": sum(b_correct) / len(b_correct), "b_correct": b_correct,
            "a_accuracy_before": sum(task_a["head"]) / len(task_a["head"]),
            "a_accuracy_head": sum(after_a["head"]) / len(after_a["head"]), "a_correct_head": after_a["head"],
            "a_probe_before": sum(task_a["probe"]) / len(task_a["probe"]),
            "a_probe_after": sum(after_a["probe"]) / len(after_a["probe"]), "a_probe_correct": after_a["probe"],
            "fraction_changed": changed / total, "changed_parameters": changed, "encoder_parameters": total,
            "mask_density": method.final_density(), "train_seconds": round(seconds, 1), "epochs": cfg.b_epochs,
        }
        if density:
            every = max(1, len(density) // 100)
            metrics["diff_density_trajectory"] = {"every": every, "density": [round(d, 5) for d in density[::every]]}
        if record is not None:
            record(metrics)
        return metrics

    try:
        metrics = distributed.on_main(evaluate_and_record)
    except BaseException:
        for loop in loops:
            loop.close()
        raise
    for loop in loops:
        loop.finish()
    return metrics


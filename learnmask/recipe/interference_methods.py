"""What each parameter-mask method of the interference recipe does to the model before task B:
which parameters train, at which rates, and what holds the rest (:mod:`learnmask.params`).

Freezing, weight masks and diff masks go through the front door (:func:`learnmask.apply_masks`
with ``freeze`` / ``weight_masks`` / ``diff_masks``, one handle); Child-Tuning's and FISH's masks
come from data and hold at the update through :class:`learnmask.params.ParameterMasks`.

A :class:`Method` is built on the task-A model with task B's new head in place; it gives the
optimizer groups, hooks into the shared loop's steps, the diff masks' stages, and the plain
weights the model ends with (for the diff against the weights before task B).

The encoder is ``model.bert`` (every parameter but the classifier head); task B's head always
trains whole, at ``head_lr``, outside the masks (FISH counts it inside its budget, as Sung et
al., 2021 do).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from learnmask.control import LagrangianController
from learnmask.control.schedules import LinearWarmup
from learnmask.inject import apply_masks
from learnmask.params import ChildTuningF, ParameterMasks, child_tuning_d_masks, empirical_fisher, fish_masks
from learnmask.recipe.interference_config import InterferenceRunConfig

#: The classifier head's parameter names in a ``*ForSequenceClassification`` model.
HEAD = ("classifier.weight", "classifier.bias")
ENCODER_PREFIX = "bert."
#: The transformer layers' parameters (weight masks cover their matrices, as Zhao et al., 2020).
LAYERS_PREFIX = "bert.encoder.layer."


def encoder_names(model: nn.Module) -> list[str]:
    """Qualified names of the encoder's parameters (everything but the classifier head)."""
    return [name for name, _ in model.named_parameters() if name.startswith(ENCODER_PREFIX)]


class Method:
    """Task B's training under ``cfg.method`` on ``model`` (task A's weights, task B's head).

    Args:
        cfg: the run's config.
        model: the classifier, modified in place (frozen parameters, masks).
        fisher_batches: ``(batch_size) -> iterable`` of task-B batches (dicts with ``labels``)
            for the Fisher information of Child-Tuning-D (``cfg.fisher_batches`` batches) and FISH
            (as many examples, one by one).

    Attributes:
        stages: the number of training phases with their own optimizer (2 for diff masks: L0
            training, then the fixed mask; else 1).
        density: fraction of the encoder's entries the method's mask lets change (None without a
            mask; Child-Tuning-F: its keep probability per step).
    """

    def __init__(self, cfg: InterferenceRunConfig, model: nn.Module, fisher_batches: Callable[[int], Iterable]):
        self.cfg, self.model = cfg, model
        self.stages = 1
        self.density: float | None = None
        self.update_masks = self.child_tuning = self.weight_masks = self.diff_masks = None
        self.controller: LagrangianController | None = None
        names = encoder_names(model)
        total = sum(p.numel() for n, p in model.named_parameters() if n in names)
        method = cfg.method
        families: dict = {}  # through the front door: lm.apply_masks(model, freeze=..., ...)
        if method == "freeze_bottom":
            layers = len(model.bert.encoder.layer)
            families["freeze"] = {"layers": list(range(layers // 2)), "pattern": f"{ENCODER_PREFIX}embeddings.*"}
        elif method == "head_only":
            families["freeze"] = {"pattern": f"{ENCODER_PREFIX}*"}
        elif method == "weight_masks":  # a mask on every matrix of the layers; embeddings, biases, norms frozen
            masked = {n for n, p in model.named_parameters()
                      if n in names and p.dim() >= 2 and n.startswith(LAYERS_PREFIX)}
            families["weight_masks"] = {"predicate": lambda n, _: n in masked}
            families["freeze"] = {"predicate": lambda n, _: n in names and n not in masked}
        elif method == "diff_masks":
            families["diff_masks"] = {"pattern": f"{ENCODER_PREFIX}*"}
            self.stages = 2
            self.density = cfg.budget
        self.handle = apply_masks(model, **families) if families else None
        if self.handle is not None:
            self.weight_masks, self.diff_masks = self.handle.weight_masks, self.handle.diff_masks
        if method in ("freeze_bottom", "head_only"):
            frozen = sum(p.numel() for n, p in model.named_parameters() if n in names and not p.requires_grad)
            self.density = 1.0 - frozen / total
        elif method == "child_tuning_f":
            params = {n: p for n, p in model.named_parameters() if n in names}
            generator = torch.Generator().manual_seed(cfg.seed * 1000 + 7)
            self.child_tuning = ChildTuningF(params, cfg.budget, generator=generator)
            self.update_masks = ParameterMasks(model, {n: torch.ones_like(p, dtype=torch.bool)
                                                       for n, p in params.items()})
            self.density = cfg.budget
        elif method in ("child_tuning_d", "fish"):
            fish = method == "fish"
            chosen = names + list(HEAD) if fish else names
            # FISH's per-example Fisher from batches of one (a backward through a batch's graph per
            # example would cost a whole batch's backward each); Child-Tuning-D's per batch
            size, count = (1, cfg.fisher_batches * cfg.batch_size) if fish else (cfg.batch_size, cfg.fisher_batches)
            fisher = empirical_fisher(model, fisher_batches(size), _example_losses if fish else _mean_loss,
                                      parameters=chosen, num_batches=count, per_example=fish)
            masks = fish_masks(fisher, cfg.budget, always_keep=HEAD) if fish else \
                child_tuning_d_masks(fisher, cfg.budget)
            self.update_masks = ParameterMasks(model, masks)
            self.density = sum(int(masks[n].sum()) for n in names) / total

    # -- optimizer ---------------------------------------------------------------------------
    def groups(self, stage: int) -> list[dict]:
        """AdamW parameter groups of ``stage`` (0, or 1 = diff masks' fixed-mask phase):
        ``"base"`` (encoder weights or diff deltas: ``lr``, weight decay), ``"head"`` (task B's
        head: ``head_lr``, weight decay) and ``"masks"`` (weight-mask scores at ``mask_lr``
        or diff ``log_alpha`` at ``gate_lr``, no decay). Empty groups are left out."""
        cfg, named = self.cfg, dict(self.model.named_parameters())
        head = [named[n] for n in HEAD]
        mask_lr = cfg.mask_lr
        if self.weight_masks is not None:
            base, masks = [], self.weight_masks.mask_parameters()
        elif self.diff_masks is not None:
            base = self.diff_masks.delta_parameters()
            masks, mask_lr = (self.diff_masks.gate_parameters() if stage == 0 else []), cfg.gate_lr
        else:
            base = [p for n, p in named.items() if n not in HEAD and p.requires_grad]
            masks = []
        groups = [{"params": base, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "base"},
                  {"params": head, "lr": cfg.head_lr, "weight_decay": cfg.weight_decay, "name": "head"},
                  {"params": masks, "lr": mask_lr, "weight_decay": 0.0, "name": "masks"}]
        return [g for g in groups if g["params"]]

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Hook the frozen parameters and the update masks to ``optimizer``."""
        if self.handle is not None:
            self.handle.attach_optimizer(optimizer)
        if self.update_masks is not None:
            self.update_masks.attach(optimizer)

    def start(self, stage: int, steps: int) -> None:
        """Before ``stage`` trains for ``steps`` steps: diff masks' controller (stage 0, target
        sparsity ``1 - budget`` reached linearly over the first half of the stage), or their
        magnitude cut to exactly ``budget`` and the fixed mask (stage 1)."""
        if self.diff_masks is None:
            return
        if stage == 0:
            target = LinearWarmup(1.0 - self.cfg.budget, max(1, steps // 2))
            self.controller = LagrangianController(target, lr=self.cfg.controller_lr,
                                                   damping=self.cfg.controller_damping)
        elif self.diff_masks.stage == "l0":
            self.diff_masks.magnitude_cut(self.cfg.budget)
            self.diff_masks.fix_mask()
            self.controller = None

    # -- steps -------------------------------------------------------------------------------
    def penalty(self) -> Tensor | None:
        """The controller's penalty on the diff masks' expected sparsity (stage a), else None;
        Child-Tuning-F draws this step's gradient mask here (before the step)."""
        if self.child_tuning is not None:
            self.child_tuning.step_masks(self.update_masks)
        if self.controller is None:
            return None
        return self.controller.penalty(1.0 - self.diff_masks.expected_density())

    def after_step(self, skipped: bool) -> None:
        if self.controller is not None and not skipped:
            self.controller.step()

    def expected_density(self) -> float | None:
        """Diff masks: the expected fraction of non-zero gates (for the logs)."""
        if self.diff_masks is None:
            return None
        with torch.no_grad():
            return float(self.diff_masks.expected_density())

    def state_dict(self) -> dict:
        return {"controller": self.controller.state_dict() if self.controller is not None else None,
                "generator": self.child_tuning.generator.get_state() if self.child_tuning is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.controller is not None and state["controller"] is not None:
            self.controller.load_state_dict(state["controller"])
        if self.child_tuning is not None:
            self.child_tuning.generator.set_state(state["generator"])

    # -- after training ----------------------------------------------------------------------
    def plain_weights(self) -> dict[str, Tensor]:
        """The weights the model computes with, as a state dict of its unmodified class."""
        if self.weight_masks is not None or self.diff_masks is not None:
            return self.handle.export_weights()
        return self.model.state_dict()

    def final_density(self) -> float | None:
        """Fraction of the encoder's entries the mask lets change, at the end of training."""
        if self.weight_masks is not None:
            return self.weight_masks.density()
        if self.diff_masks is not None:
            kept = self.diff_masks.kept_masks()
            return sum(int(m.sum()) for m in kept.values()) / self.diff_masks.total
        return self.density


def _mean_loss(model: nn.Module, batch: dict) -> Tensor:
    """``()`` mean cross-entropy of a batch (dict with ``labels``)."""
    return nn.functional.cross_entropy(model(**{k: v for k, v in batch.items() if k != "labels"}).logits,
                                       batch["labels"])


def _example_losses(model: nn.Module, batch: dict) -> Tensor:
    """``(B,)`` per-example cross-entropy of a batch (FISH's per-example Fisher)."""
    return nn.functional.cross_entropy(model(**{k: v for k, v in batch.items() if k != "labels"}).logits,
                                       batch["labels"], reduction="none")

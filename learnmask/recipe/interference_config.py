"""The validated config of one interference run (``recipe = "interference"``): a classifier
fine-tuned on task A (TREC-6), then on task B (Rotten Tomatoes) with a parameter-mask method,
and task A measured again. Unknown keys are errors. What runs it:
:mod:`learnmask.recipe.interference`."""
from __future__ import annotations

import dataclasses

from learnmask.recipe.validated import ValidatedConfig

#: The methods of task B's fine-tuning (see :mod:`learnmask.recipe.interference_methods`):
#: ``full`` every parameter; ``freeze_bottom`` embeddings and the bottom half of the layers
#: frozen; ``child_tuning_f`` / ``child_tuning_d`` Child-Tuning (Xu et al., 2021), task-free
#: (a new Bernoulli(``budget``) gradient mask every step, kept gradients scaled by 1/budget) and
#: task-driven (the ``budget`` fraction of encoder entries with the largest Fisher information);
#: ``fish`` FISH masks (Sung et al., 2021; ``budget`` of all entries, task B's head inside it);
#: ``weight_masks`` piggyback masks over the frozen matrices of the transformer layers (Mallya et
#: al., 2018; Zhao et al., 2020: embeddings, biases and norms frozen);
#: ``diff_masks`` diff pruning to ``budget`` of the encoder's entries (Guo et al., 2021);
#: ``head_only`` only task B's classifier trains.
METHODS = ("full", "freeze_bottom", "child_tuning_f", "child_tuning_d", "fish", "weight_masks", "diff_masks",
           "head_only")
#: Methods whose ``budget`` means something; the others run at budget 1.0.
BUDGETED = ("child_tuning_f", "child_tuning_d", "fish", "diff_masks")
#: Fields only task B reads: the task-A weights' key leaves them out, so every cell of a seed
#: starts from the same task-A model.
TASK_B_FIELDS = ("method", "budget", "b_path", "b_train_examples", "b_test_examples", "b_epochs", "b_max_length",
                 "lr", "head_lr", "mask_lr", "gate_lr", "fisher_batches", "diff_fixed_fraction", "controller_lr",
                 "controller_damping", "probe_examples")


@dataclasses.dataclass(frozen=True)
class InterferenceRunConfig(ValidatedConfig):
    """One run: all-MiniLM-L6-v2 fine-tuned on task A, then on task B with ``method``.

    Attributes:
        method: one of :data:`METHODS`.
        budget: the method's fraction in (0, 1]: Child-Tuning-F's keep probability ``p_F``,
            Child-Tuning-D's ``p_D``, FISH's and diff pruning's fraction of entries that may
            change; exactly 1.0 for the other methods.
        seed: seeds the split-independent randomness: heads, data order, masks, gate samples.
        model_path: a local MiniLM folder ("" = the packaged one); a_path / b_path: local data
            files ("" = the installed packages, see :mod:`learnmask.data`).
        a_test_examples, b_test_examples: held-out examples of the fixed seeded splits (split
            seed 0, the same for every run); a_train_examples, b_train_examples: the first N
            of the training splits (0 = all).
        a_epochs, b_epochs: passes over task A's / task B's training examples.
        a_max_length, b_max_length: tokens per example, specials included.
        batch_size, weight_decay, warmup_ratio: both tasks (AdamW, linear warm-up then decay).
        a_lr: task A's learning rate (every parameter); lr: task B's for encoder weights
            (and Child-Tuning/FISH/diff deltas); head_lr: task B's new classifier head.
        mask_lr: the weight-mask scores' rate (piggyback used 1e-4 with Adam; a score moves
            about ``mask_lr`` per step, from 1e-2 towards the threshold 5e-3).
        gate_lr: the diff masks' ``log_alpha`` rate (a logit moves about ``gate_lr`` per step
            with Adam, from 5 at the start; P(z != 0) = 0.5% at about -5.3).
        fisher_batches: batches of task B (of ``batch_size``) whose Fisher information chooses
            Child-Tuning-D's and FISH's masks.
        diff_fixed_fraction: diff masks: the last fraction of task B's steps fine-tunes the
            fixed mask (stage c) after the magnitude cut; the rest is L0 training (stage a).
        controller_lr, controller_damping: the Lagrangian controller driving the diff masks'
            expected density to ``budget`` during stage (a).
        probe_examples: task-A training examples the linear probe is fitted on (0 = all).
    """

    method: str = "full"
    budget: float = 1.0
    seed: int = 0
    model_path: str = ""
    a_path: str = ""
    b_path: str = ""
    a_train_examples: int = 0
    a_test_examples: int = 1000
    b_train_examples: int = 4000
    b_test_examples: int = 2000
    a_epochs: int = 1
    b_epochs: int = 1
    a_max_length: int = 48
    b_max_length: int = 64
    batch_size: int = 32
    a_lr: float = 5e-5
    lr: float = 5e-5
    head_lr: float = 1e-3
    mask_lr: float = 1e-4
    gate_lr: float = 0.2
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    fisher_batches: int = 8
    diff_fixed_fraction: float = 0.3
    controller_lr: float = 0.5
    controller_damping: float = 10.0
    probe_examples: int = 2000

    GRID_AXES = ("budget",)

    def __post_init__(self):
        self._check_types()
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {list(METHODS)}")
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be a fraction in (0, 1]; got {self.budget}")
        if self.method not in BUDGETED and self.budget != 1.0:
            raise ValueError(f"method {self.method!r} has no budget: budget must be 1.0, got {self.budget} "
                             f"(budgeted methods: {list(BUDGETED)})")
        for name in ("a_epochs", "b_epochs", "a_max_length", "b_max_length", "batch_size", "fisher_batches",
                     "a_test_examples", "b_test_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("a_train_examples", "b_train_examples", "probe_examples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = all); got {getattr(self, name)}")
        for name in ("a_lr", "lr", "head_lr", "mask_lr", "gate_lr", "controller_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}")
        for name in ("weight_decay", "controller_damping"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        for name in ("warmup_ratio", "diff_fixed_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1); got {getattr(self, name)}")

    def task_a_key(self) -> str:
        """Key of the task-A model every run of this seed starts from (the settings but
        :data:`TASK_B_FIELDS`)."""
        return self._hash({k: v for k, v in dataclasses.asdict(self).items() if k not in TASK_B_FIELDS})

"""The validated config of one token-pruning run (``recipe = "tokens"``), parsed from TOML;
unknown keys are errors. What runs it: :mod:`learnmask.recipe.tokens`."""
from __future__ import annotations

import dataclasses

from learnmask.recipe.validated import NEUTRAL_AT_DEFAULT, ValidatedConfig

#: ``full``: no token pruning (keep 1.0), the reference every pruned row starts from and is
#: timed against; ``gates``: learned token gates (hard-concrete) driven to the keep ratio by a
#: Lagrangian controller; ``gates_adaptive``: the same, with the target keep ratio moved from the
#: task loss by a :class:`~learnmask.control.LossAdaptiveController` during the warm-up (then
#: gliding to ``keep_ratio``); ``random``: seeded random tokens; ``attention``: the tokens receiving the most
#: CLS attention (EViT-style, Liang et al. 2022).
TOKEN_METHODS = ("full", "gates", "gates_adaptive", "random", "attention")
#: Task name -> what it is (model and data); see :mod:`learnmask.recipe.token_tasks`.
TOKEN_TASKS = ("bbcnews-minilm", "fashion-vit")
#: Fields that only token gates read: a ``full`` run's key leaves them out.
GATE_FIELDS = ("keep_ratio", "gate_lr", "controller_lr", "controller_damping", "keep_warmup", "hard_fraction",
               "token_layers", "gate_init_log_alpha", "adaptive_max_step", "adaptive_tolerance", "gate_warmup",
               "adaptive_within_ramp")
#: Fields that only the pruning phase reads: the dense weights' key (:meth:`TokenRunConfig.dense_key`)
#: leaves them out, so every cell of a grid starts from the dense weights of its task and seed.
PRUNE_FIELDS = (*GATE_FIELDS, "method", "prune_epochs", "prune_examples", "prune_lr")


@dataclasses.dataclass(frozen=True)
class TokenRunConfig(ValidatedConfig):
    """One run of token pruning on a classifier. The dense model is trained first (fine-tuned
    MiniLM, or a ViT from scratch; ``epochs`` on ``train_examples``, cached and shared by the
    cells of a task and seed); every run then starts from those weights and trains
    ``prune_epochs`` more on ``prune_examples``: a pruned run with its tokens pruned (then
    exported with :meth:`~learnmask.inject.MaskHandle.export_token_pruning` and measured), the
    ``full`` run with every token, so the keep-1.0 row has had the same training steps.

    Attributes:
        task: ``bbcnews-minilm`` (all-MiniLM-L6-v2 on BBC News topics, text) or ``fashion-vit``
            (a 4-layer ViT, patch 4, on Fashion-MNIST: 49 patches + CLS = 50 tokens).
        method: one of :data:`TOKEN_METHODS`.
        keep_ratio: fraction of each example's real tokens (CLS included) kept after the last
            pruning layer, in (0, 1]; 1.0 exactly for ``full`` and below 1 otherwise.
        seed: seeds the new head or the ViT, the data order, gate samples, random tokens.
        dataset_path: a local data folder (default: the installed package, see ``learnmask.data``
            and ``learnmask.image_data``); model_path: a local MiniLM folder (text only).
        train_examples, test_examples: the first N of the fixed training / held-out split
            (0 = all); prune_examples: the first N of those for the pruning phase (0 = all).
        epochs: passes of the dense training; prune_epochs: passes of the pruning phase;
            prune_lr: its AdamW learning rate (0 = ``lr``; a model trained from scratch keeps
            its accuracy better through a short phase at a lower rate).
        batch_size, max_length (text tokens, specials included), lr, weight_decay,
            warmup_ratio: the usual settings (``lr`` of AdamW; ``warmup_ratio`` in [0, 1)).
        token_layers: layers after which tokens are pruned (0-based); empty = the task's
            default (MiniLM: after layers 1 and 3 of 6; ViT: after layer 1 of 4).
        keep_warmup: fraction of the pruning steps over which the keep ratio moves from 1 to
            ``keep_ratio`` (linearly; the loss-adaptive row moves it from the loss instead).
        hard_fraction: learned gates: the last fraction of the pruning steps trains with the
            eval rule (exactly the top-k tokens of the learned scores; LTP's hard stage, Kim
            et al. 2022), in [0, 1 - keep_warmup]; 0 = soft gates to the end.
        gate_lr, gate_init_log_alpha: AdamW learning rate of the token scorers and their
            initial logit (3.0: nearly all kept).
        gate_warmup: fraction of the pruning steps, in [0, 1), over which the scorers' learning
            rate rises linearly to ``gate_lr`` (0: the full rate from the first step). Adam's
            first steps are sign steps of about the learning rate on every weight: on a fresh
            ViT scorer (d = 192) at ``gate_lr`` 0.05 the first one moved the expected keep ratio
            from 0.99 to 0.39, and the backbone trained through that swing. Rounded to whole
            steps; under 2 steps (a very short phase) there is no warm-up.
        controller_lr, controller_damping: the Lagrangian controller (dual-ascent rate, damping).
        adaptive_max_step: the loss-adaptive controller's step per update; 0 = twice the
            linear ramp's step, so a loss that counts as easy half of the time reaches
            ``keep_ratio``. After the warm-up the target glides from wherever the controller
            left it to ``keep_ratio`` at this step per update (no jump for the gates to catch).
        adaptive_tolerance: relative slack >= 0 of the loss-adaptive controller: a batch loss up
            to ``(1 + tolerance)`` times its running level counts as easy (a step toward fewer
            tokens). At 0 a loss at its plateau (a noisy batch loss around a flat level) is easy
            half of the time and the keep ratio random-walks near 1.
        adaptive_within_ramp: the loss-adaptive target never exceeds the linear ramp of
            ``keep_warmup`` (so it is ``keep_ratio`` when the warm-up ends, and no glide
            follows): the loss may prune faster than the ramp, never later. Off (the default),
            a noisy loss can hold the target near 1 through the warm-up and then drop it fast;
            on Fashion-MNIST the expected keep ratio then overshot to 0.11 against a target of
            0.5 and the accuracy fell by about 1 point.
    """

    task: str = "bbcnews-minilm"
    method: str = "full"
    keep_ratio: float = 1.0
    seed: int = 0
    dataset_path: str = ""
    model_path: str = ""
    train_examples: int = 0
    test_examples: int = 0
    prune_examples: int = 0
    epochs: int = 1
    prune_epochs: int = 1
    batch_size: int = 16
    max_length: int = 256
    lr: float = 5e-5
    prune_lr: float = 0.0
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    token_layers: list = dataclasses.field(default_factory=list)
    keep_warmup: float = 0.5
    hard_fraction: float = 0.25
    gate_lr: float = 0.01
    gate_init_log_alpha: float = 3.0
    controller_lr: float = 0.5
    controller_damping: float = 10.0
    adaptive_max_step: float = 0.0
    adaptive_tolerance: float = 0.1
    gate_warmup: float = dataclasses.field(default=0.0, metadata=NEUTRAL_AT_DEFAULT)
    adaptive_within_ramp: bool = dataclasses.field(default=False, metadata=NEUTRAL_AT_DEFAULT)

    GRID_AXES = ("keep_ratio",)

    def __post_init__(self):
        self._check_types()
        if self.task not in TOKEN_TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {list(TOKEN_TASKS)}")
        if self.method not in TOKEN_METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {list(TOKEN_METHODS)}")
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be a fraction in (0, 1]; got {self.keep_ratio}")
        if self.method == "full" and self.keep_ratio != 1.0:
            raise ValueError(f"method 'full' prunes no token: keep_ratio must be 1.0, got {self.keep_ratio}")
        if self.method != "full" and self.keep_ratio == 1.0:
            raise ValueError(f"method {self.method!r} with keep_ratio 1.0 prunes nothing; use method 'full' for the "
                             "keep-1.0 reference, or a keep_ratio below 1")
        for name in ("epochs", "prune_epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("train_examples", "test_examples", "prune_examples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = all); got {getattr(self, name)}")
        if not 0.0 <= self.hard_fraction <= 1.0 - self.keep_warmup:
            raise ValueError(f"hard_fraction must be in [0, 1 - keep_warmup] = [0, {1.0 - self.keep_warmup:g}] (the "
                             f"hard stage starts after the keep ratio's warm-up); got {self.hard_fraction}")
        for name in ("warmup_ratio", "keep_warmup", "gate_warmup"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1); got {getattr(self, name)}")
        for name in ("lr", "gate_lr", "controller_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}")
        for name in ("controller_damping", "adaptive_max_step", "adaptive_tolerance", "prune_lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        layers = self.token_layers
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers) or \
                any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"token_layers must be strictly increasing layer indices >= 0 (empty: the task's "
                             f"default); got {layers!r}")
        object.__setattr__(self, "token_layers", list(layers))

    def dense_twin(self) -> TokenRunConfig:
        """The ``full`` run of the same task, data and seed (the keep-1.0 row of this run)."""
        return dataclasses.replace(self, method="full", keep_ratio=1.0)

    def key(self) -> str:
        """As :meth:`ValidatedConfig.key`; a ``full`` run leaves out :data:`GATE_FIELDS`."""
        if self.method != "full":
            return super().key()
        return self._hash({k: v for k, v in dataclasses.asdict(self).items() if k not in GATE_FIELDS})

    def dense_key(self) -> str:
        """Key of the dense weights every run starts from: the settings but :data:`PRUNE_FIELDS`."""
        return self._hash({k: v for k, v in dataclasses.asdict(self).items() if k not in PRUNE_FIELDS})

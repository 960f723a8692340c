"""The validated config of one token-pruning run (``recipe = "tokens"``), parsed from TOML;
unknown keys are errors. What runs it: :mod:`learnmask.recipe.tokens`."""
from __future__ import annotations

import dataclasses

from learnmask.recipe.validated import ValidatedConfig

#: ``full``: no token pruning (keep 1.0), the reference every pruned row starts from and is
#: timed against; ``gates``: learned token gates (hard-concrete) driven to the keep ratio by a
#: Lagrangian controller; ``gates_adaptive``: the same, with the target keep ratio moved from the
#: task loss by a :class:`~learnmask.control.LossAdaptiveController` (pinned to ``keep_ratio``
#: at the end); ``random``: seeded random tokens; ``attention``: the tokens receiving the most
#: CLS attention (EViT-style, Liang et al. 2022).
TOKEN_METHODS = ("full", "gates", "gates_adaptive", "random", "attention")
#: Task name -> what it is (model and data); see :mod:`learnmask.recipe.token_tasks`.
TOKEN_TASKS = ("bbcnews-minilm", "fashion-vit")
#: Fields that only the pruning phase reads: a ``full`` run's key leaves them out, so every
#: pruned cell of a grid finds the ``full`` run of its task and seed (its dense twin).
PRUNE_FIELDS = ("keep_ratio", "prune_epochs", "gate_lr", "controller_lr", "controller_damping", "keep_warmup",
                "token_layers", "gate_init_log_alpha", "adaptive_max_step")


@dataclasses.dataclass(frozen=True)
class TokenRunConfig(ValidatedConfig):
    """One run of token pruning on a classifier: the ``full`` model is trained first (fine-tuned
    MiniLM, or a ViT from scratch); a pruned run starts from its weights and trains
    ``prune_epochs`` more with its tokens pruned, then is exported
    (:meth:`~learnmask.inject.MaskHandle.export_token_pruning`) and measured.

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
        epochs: passes of the ``full`` training; prune_epochs: passes of the pruning phase.
        batch_size, max_length (text tokens, specials included), lr, weight_decay,
            warmup_ratio: the usual settings (``lr`` of AdamW; ``warmup_ratio`` in [0, 1)).
        token_layers: layers after which tokens are pruned (0-based); empty = the task's
            default (MiniLM: after layers 1 and 3 of 6; ViT: after layer 1 of 4).
        keep_warmup: fraction of the pruning steps over which the keep ratio moves from 1 to
            ``keep_ratio`` (linearly; the loss-adaptive row moves it from the loss instead).
        gate_lr, gate_init_log_alpha: AdamW learning rate of the token scorers and their
            initial logit (3.0: nearly all kept).
        controller_lr, controller_damping: the Lagrangian controller (dual-ascent rate, damping).
        adaptive_max_step: the loss-adaptive controller's step per update; 0 = twice the
            linear ramp's step, so a loss that falls half of the time reaches ``keep_ratio``.
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
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    token_layers: list = dataclasses.field(default_factory=list)
    keep_warmup: float = 0.5
    gate_lr: float = 0.01
    gate_init_log_alpha: float = 3.0
    controller_lr: float = 0.5
    controller_damping: float = 10.0
    adaptive_max_step: float = 0.0

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
        for name in ("warmup_ratio", "keep_warmup"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1); got {getattr(self, name)}")
        for name in ("lr", "gate_lr", "controller_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}")
        for name in ("controller_damping", "adaptive_max_step"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        layers = self.token_layers
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers) or \
                any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"token_layers must be strictly increasing layer indices >= 0 (empty: the task's "
                             f"default); got {layers!r}")
        object.__setattr__(self, "token_layers", list(layers))

    def dense_twin(self) -> TokenRunConfig:
        """The ``full`` run whose trained weights this run starts from (same task, data, seed)."""
        return dataclasses.replace(self, method="full", keep_ratio=1.0)

    def key(self) -> str:
        """As :meth:`ValidatedConfig.key`; a ``full`` run leaves out :data:`PRUNE_FIELDS`."""
        if self.method != "full":
            return super().key()
        values = {k: v for k, v in dataclasses.asdict(self).items() if k not in PRUNE_FIELDS}
        return self._hash(values)

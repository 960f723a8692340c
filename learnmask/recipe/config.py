"""The validated config of one classification run, parsed from TOML (``tomllib``); unknown keys
are errors. Grids of such runs: :mod:`learnmask.recipe.grid`."""
from __future__ import annotations

import dataclasses

from learnmask.control.schedules import SCHEDULE_KINDS
from learnmask.recipe.mask_spec import FIXED_GATES, PENALTY_CONTROLLERS, MaskSpec, preset
from learnmask.recipe.validated import NEUTRAL_AT_DEFAULT, ValidatedConfig

#: ``gates``: gates as the run's ``masks`` table says; the others are presets of that table.
METHODS = ("dense", "hard_concrete", "topk", "random", "importance", "gates")
CONTROLLERS = PENALTY_CONTROLLERS


@dataclasses.dataclass(frozen=True)
class RunConfig(ValidatedConfig):
    """One fine-tuning run of a classifier, with or without gates; every gated run ends finalized.

    Attributes:
        method: ``dense`` (no gates); ``gates``: the gates the ``masks`` table describes (see
            :class:`~learnmask.recipe.mask_spec.MaskSpec`); or a preset of that table:
            ``hard_concrete`` (learned hard-concrete head gates driven by ``controller``;
            Louizos et al. 2018, Xia et al. 2022), ``topk`` (straight-through top-k head scores,
            Sanh et al. 2020), ``random`` (random heads removed before fine-tuning),
            ``importance`` (Michel et al. 2019: |∂L/∂gate| after dense fine-tuning, heads
            removed, then ``importance_epochs`` with the mask fixed).
        masks: with ``method = "gates"``: units, gate kind, controller and sparsity measure
            (a TOML table; keys of ``MaskSpec``); stored with every key filled in.
        target_sparsity: fraction of units (or parameters, with ``masks.sparsity =
            "parameters"``) removed, in [0, 1); 0 for ``dense``.
        seed: seeds the classifier head, the data order, gate samples and random removal.
        dataset, dataset_path: a name known to :func:`learnmask.data.load_dataset` and an
            optional local file; ``test_size`` held-out examples (fixed split, seed 0).
        model_path: folder of a Hugging Face BERT-family checkpoint; empty = the packaged
            all-MiniLM-L6-v2.
        epochs: passes over the training set (``importance`` adds ``importance_epochs``).
        max_train_examples: 0 = all; otherwise the first N of the (fixed) training split.
        batch_size, max_length, lr, weight_decay, warmup_ratio: the usual fine-tuning settings;
            ``lr`` in 1/step units of AdamW, ``warmup_ratio`` in [0, 1).
        freeze: name substrings of parameters kept frozen (the word embeddings by default:
            11.7M of MiniLM's 22.7M parameters, and most of the step time on CPU).
        gate_lr: AdamW learning rate of the gate logits (no weight decay).
        gate_init_log_alpha: initial ``log_alpha`` of hard-concrete gates (3.0: nearly open,
            deterministic gate 1; 0.0: CoFi's ``droprate_init = 0.5``, gate 0.5, noisy samples).
        controller_lr: dual-ascent learning rate of the Lagrangian multipliers.
        sparsity_warmup: fraction of the steps over which the target rises linearly from 0.
        gate_phase: fraction of the steps during which gates learn; afterwards the
            deterministic top-k mask is fixed and the model alone fine-tunes, with the
            learning-rate schedule restarted (two stages, as in CoFi pruning).
        importance_epochs: epochs with the mask fixed after importance-based removal.
        controller: what drives hard-concrete gates to the target: ``lagrangian`` (dual ascent,
            learning rate ``controller_lr``), ``pi`` (PI control of the multiplier, Stooke et
            al. 2020, gains ``controller_kp``, ``controller_ki``) or ``fixed`` (a constant L0
            penalty ``l0_weight``, no target: the baseline).
        controller_damping: coefficient ``c`` >= 0 of the damping term ``(c/2)(s - t)^2`` that
            the Lagrangian and PI controllers add to the penalty (Platt & Barr, 1988).
        text_column, label_column: columns of a user's own file (``dataset = "file"``).
        sparsity_schedule: how the target rises over ``sparsity_warmup``: ``linear`` or
            ``cubic`` (Zhu & Gupta, 2017), or ``constant`` (the final target from step 0).
    """

    method: str = "dense"
    target_sparsity: float = 0.0
    seed: int = 0
    dataset: str = "trec6"
    dataset_path: str = ""
    test_size: int = 1000
    model_path: str = ""
    epochs: int = 2
    max_train_examples: int = 0
    batch_size: int = 32
    max_length: int = 48
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    freeze: tuple[str, ...] = ("embeddings.word_embeddings",)
    gate_lr: float = 0.1
    gate_init_log_alpha: float = 3.0
    controller_lr: float = 0.5
    sparsity_warmup: float = 0.25
    gate_phase: float = 0.5
    importance_epochs: int = 1
    controller: str = dataclasses.field(default="lagrangian", metadata=NEUTRAL_AT_DEFAULT)
    controller_kp: float = dataclasses.field(default=1.0, metadata=NEUTRAL_AT_DEFAULT)
    controller_ki: float = dataclasses.field(default=0.1, metadata=NEUTRAL_AT_DEFAULT)
    controller_damping: float = dataclasses.field(default=10.0, metadata=NEUTRAL_AT_DEFAULT)
    l0_weight: float = dataclasses.field(default=0.1, metadata=NEUTRAL_AT_DEFAULT)
    sparsity_schedule: str = dataclasses.field(default="linear", metadata=NEUTRAL_AT_DEFAULT)
    text_column: str = dataclasses.field(default="text", metadata=NEUTRAL_AT_DEFAULT)
    label_column: str = dataclasses.field(default="label", metadata=NEUTRAL_AT_DEFAULT)
    masks: dict = dataclasses.field(default_factory=dict, metadata=NEUTRAL_AT_DEFAULT)

    #: a list of targets in a grid row expands into one cell per target
    GRID_AXES = ("target_sparsity",)

    def __post_init__(self):
        self._check_types()
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {list(METHODS)}")
        if not 0.0 <= self.target_sparsity < 1.0:
            raise ValueError(f"target_sparsity must be in [0, 1); got {self.target_sparsity}")
        if self.method == "dense" and self.target_sparsity != 0.0:
            raise ValueError(f"method 'dense' has no gates; target_sparsity must be 0, got {self.target_sparsity}")
        if self.method != "dense" and self.target_sparsity == 0.0:
            raise ValueError(f"method {self.method!r} needs target_sparsity in (0, 1); got 0")
        for name in ("epochs", "batch_size", "max_length", "test_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("max_train_examples", "importance_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        for name in ("warmup_ratio", "sparsity_warmup"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1); got {getattr(self, name)}")
        if not 0.0 < self.gate_phase <= 1.0:
            raise ValueError(f"gate_phase must be in (0, 1]; got {self.gate_phase}")
        for name in ("lr", "gate_lr", "controller_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}")
        if self.sparsity_schedule not in SCHEDULE_KINDS:
            raise ValueError(f"unknown sparsity_schedule {self.sparsity_schedule!r}; "
                             f"expected one of {list(SCHEDULE_KINDS)}")
        if self.controller not in CONTROLLERS:
            raise ValueError(f"unknown controller {self.controller!r}; expected one of {list(CONTROLLERS)}")
        for name in ("controller_kp", "controller_ki", "controller_damping", "l0_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        object.__setattr__(self, "freeze", tuple(self.freeze))
        self._check_masks()

    def _check_masks(self) -> None:
        """``masks`` only with ``method = "gates"``, where it is stored with every key filled in."""
        if self.method != "gates":
            if self.masks:
                raise ValueError(f"masks is read with method = 'gates' only; got method {self.method!r}, which is "
                                 "dense or a preset of the table; set method = 'gates' to describe the gates yourself")
            return
        values = dict(self.masks)
        if "controller" not in values and values.get("gate", "hard_concrete") not in (*FIXED_GATES, "topk"):
            values["controller"] = self.controller  # the run's controller is the table's default
        elif "controller" in values and self.controller != "lagrangian" and values["controller"] != self.controller:
            raise ValueError(f"controller is given twice: masks.controller = {values['controller']!r} and "
                             f"controller = {self.controller!r}; keep one")
        try:
            spec = MaskSpec.from_dict(values)
        except TypeError as error:  # a value of the wrong kind inside the table
            raise ValueError(f"masks: {error}") from error
        object.__setattr__(self, "masks", spec.as_dict())

    def mask_spec(self) -> MaskSpec | None:
        """What this run gates (None for ``dense``): the ``masks`` table or the method's preset."""
        if self.method == "gates":
            return MaskSpec.from_dict(self.masks)
        return preset(self.method, controller=self.controller, gate_init_log_alpha=self.gate_init_log_alpha)

    def total_epochs(self) -> int:
        """Epochs of training this run uses, counting the dense fine-tuning behind ``importance``."""
        spec = self.mask_spec()
        return self.epochs + (self.importance_epochs if spec is not None and spec.gate == "importance" else 0)


# Grids moved to learnmask.recipe.grid; these names stay importable from here.
from learnmask.recipe.grid import GridConfig, GridRow, load_grid  # noqa: E402,F401

"""Validated run and grid configs, parsed from TOML (``tomllib``); unknown keys are errors."""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import pathlib
import tomllib
from typing import Any

from learnmask.control.schedules import SCHEDULE_KINDS

METHODS = ("dense", "hard_concrete", "topk", "random", "importance")
CONTROLLERS = ("lagrangian", "pi", "fixed")
# Fields added after results were first recorded. At their default they reproduce the earlier
# behaviour exactly, so key() leaves them out there and finished cells stay finished.
NEUTRAL_AT_DEFAULT = {"neutral_at_default": True}


class ValidatedConfig:
    """Shared parts of the run configs (frozen dataclasses): type checks against each field's
    default, construction from a mapping that rejects unknown keys, and a stable key."""

    def _check_types(self) -> None:
        """Each field has its default's type (an int is accepted for a float); else ValueError."""
        for field in dataclasses.fields(self):
            value, default = getattr(self, field.name), field.default
            if isinstance(default, tuple):
                ok = isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value)
                expected = "a list of strings"
            elif isinstance(default, float):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                expected = "a number"
                if ok:
                    object.__setattr__(self, field.name, float(value))
            else:
                ok = isinstance(value, type(default)) and not (isinstance(value, bool) and not isinstance(default, bool))
                expected = {int: "an integer", str: "a string"}.get(type(default), type(default).__name__)
            if not ok:
                raise ValueError(f"{field.name} must be {expected}; got {type(value).__name__} {value!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, where: str = "config"):
        """Build from a mapping, rejecting unknown keys with the list of known ones.

        Raises:
            ValueError: an unknown key, a value of the wrong type or out of range; the message
                names ``where`` (the file, or the grid and row).
        """
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in {where}; known keys: {sorted(known)}")
        try:
            return cls(**values)
        except ValueError as error:
            raise ValueError(f"{error} (in {where})") from error

    def key(self) -> str:
        """Stable id of this run: a hash of every field (a changed setting is a new run).

        Fields marked neutral-at-default are left out while at their default, so adding an
        option does not orphan results recorded before it existed.
        """
        values = dataclasses.asdict(self)
        for field in dataclasses.fields(self):
            if field.metadata.get("neutral_at_default") and values[field.name] == field.default:
                del values[field.name]
        return self._hash(values)

    @staticmethod
    def _hash(values: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class RunConfig(ValidatedConfig):
    """One fine-tuning run of a classifier, with or without head gates.

    Attributes:
        method: ``dense`` (no gates), ``hard_concrete`` (learned hard-concrete head gates driven
            by a Lagrangian controller; Louizos et al. 2018, Xia et al. 2022), ``topk``
            (straight-through top-k head scores, Sanh et al. 2020), ``random`` (random heads
            removed before fine-tuning), ``importance`` (Michel et al. 2019: |∂L/∂gate| after
            dense fine-tuning, heads removed, then ``importance_epochs`` with the mask fixed).
        target_sparsity: fraction of heads removed, in [0, 1); 0 for ``dense``.
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
            raise ValueError(f"unknown sparsity_schedule {self.sparsity_schedule!r}; expected one of {list(SCHEDULE_KINDS)}")
        if self.controller not in CONTROLLERS:
            raise ValueError(f"unknown controller {self.controller!r}; expected one of {list(CONTROLLERS)}")
        for name in ("controller_kp", "controller_ki", "controller_damping", "l0_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        object.__setattr__(self, "freeze", tuple(self.freeze))

    def total_epochs(self) -> int:
        """Epochs of training this run uses, counting the dense fine-tuning behind ``importance``."""
        return self.epochs + (self.importance_epochs if self.method == "importance" else 0)


@dataclasses.dataclass(frozen=True)
class GridRow:
    """One row of an ablation table: a label and the run settings it overrides."""

    label: str
    settings: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class GridConfig:
    """An ablation grid: rows × target sparsities × seeds, over shared defaults.

    TOML layout::

        name = "heads"
        seeds = [0]            # default run
        full_seeds = [0, 1, 2] # with --full
        [defaults]             # any RunConfig field
        epochs = 2
        [[rows]]
        label = "hard-concrete + Lagrangian"
        method = "hard_concrete"
        target_sparsity = [0.5, 0.9]   # a list expands into one cell per value
    """

    name: str
    seeds: tuple[int, ...]
    full_seeds: tuple[int, ...]
    defaults: dict[str, Any]
    rows: tuple[GridRow, ...]
    title: str = ""
    goals: tuple[dict[str, Any], ...] = ()
    columns: tuple[str, ...] = ()
    recipe: str = "classify"  # which run config the cells are: see RECIPES

    def cells(self, *, full: bool = False, overrides: dict[str, Any] | None = None) -> list[tuple[str, Any]]:
        """Every (row label, run config) of the grid, dense-first, in a fixed order.

        Raises:
            ValueError: a setting that the run config rejects (named with its row).
        """
        if self.recipe != "classify":
            return self._plain_cells(full, overrides)
        fixed = sorted({"seed", "target_sparsity"} & set(overrides or {}))
        if fixed:
            raise ValueError(f"{fixed} are set by the grid (seeds, full_seeds and each row's targets), not by --set; "
                             "edit the grid file or pass --grid-file")
        seeds = self.full_seeds if full else self.seeds
        cells = []
        for row in self.rows:
            settings = {**self.defaults, **row.settings, **(overrides or {})}
            targets = settings.pop("target_sparsity", 0.0)
            targets = targets if isinstance(targets, list) else [targets]
            for target, seed in itertools.product(targets, seeds):
                where = f"grid {self.name!r}, row {row.label!r}"
                cells.append((row.label, RunConfig.from_dict({**settings, "target_sparsity": target, "seed": seed}, where=where)))
        return cells

    def _plain_cells(self, full: bool, overrides: dict[str, Any] | None) -> list[tuple[str, Any]]:
        """Rows × seeds for recipes without target sparsities."""
        if "seed" in (overrides or {}):
            raise ValueError("['seed'] is set by the grid (seeds, full_seeds), not by --set; edit the grid file or pass --grid-file")
        config = recipe_config(self.recipe)
        return [(row.label, config.from_dict({**self.defaults, **row.settings, **(overrides or {}), "seed": seed},
                                              where=f"grid {self.name!r}, row {row.label!r}"))
                for row in self.rows for seed in (self.full_seeds if full else self.seeds)]


#: Recipes a grid file may name with ``recipe = "..."``: classification (default) and continued MLM.
RECIPES = ("classify", "mlm")


def recipe_config(recipe: str) -> type:
    """The run-config class of ``recipe``.

    Raises:
        ValueError: an unknown recipe (the message lists the known ones).
    """
    if recipe == "classify":
        return RunConfig
    if recipe == "mlm":
        from learnmask.recipe.mlm_config import MLMRunConfig

        return MLMRunConfig
    raise ValueError(f"unknown recipe {recipe!r}; expected one of {list(RECIPES)}")


GRID_KEYS = {"name", "title", "seeds", "full_seeds", "defaults", "rows", "goals", "columns", "recipe"}
GOAL_FORMS = (
    {"description", "row", "target", "versus", "versus_target", "min_difference"},
    {"description", "row", "target", "versus", "versus_target", "max_difference"},
    {"description", "row", "target", "max"},
)


def _check_goals(path, goals: list, labels: set[str]) -> tuple[dict, ...]:
    for number, goal in enumerate(goals, start=1):
        keys = set(goal) - {"metric"}
        if keys not in GOAL_FORMS:
            forms = " or ".join(str(sorted(form)) for form in GOAL_FORMS)
            raise ValueError(f"{path}: goal {number} has keys {sorted(goal)}; expected {forms} (plus optional 'metric')")
        for key in ("row", "versus"):
            if key in goal and goal[key] not in labels:
                raise ValueError(f"{path}: goal {number} names row {goal[key]!r}; rows are {sorted(labels)}")
    return tuple(goals)


def load_grid(path: str | pathlib.Path) -> GridConfig:
    """Parse and validate a grid TOML file (every cell is built once to check it).

    Raises:
        FileNotFoundError: no such file.
        ValueError: TOML syntax, unknown keys (top level, defaults or rows), a row without a
            label, or an invalid setting.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid file {path} not found; run from the repository root or pass --grid-file PATH")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path} is not valid TOML: {error}") from error
    unknown = sorted(set(data) - GRID_KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} at the top of {path}; known keys: {sorted(GRID_KEYS)}")
    rows = []
    for number, row in enumerate(data.get("rows", []), start=1):
        if "label" not in row:
            raise ValueError(f"{path}: row {number} has no 'label'")
        settings = {k: v for k, v in row.items() if k != "label"}
        rows.append(GridRow(row["label"], settings))
    if not rows:
        raise ValueError(f"{path} defines no [[rows]]")
    grid = GridConfig(
        name=data.get("name", path.stem),
        seeds=tuple(data.get("seeds", [0])),
        full_seeds=tuple(data.get("full_seeds", data.get("seeds", [0]))),
        defaults=dict(data.get("defaults", {})),
        rows=tuple(rows),
        title=data.get("title", data.get("name", path.stem)),
        goals=_check_goals(path, data.get("goals", []), {row.label for row in rows}),
        columns=tuple(data.get("columns", [])),
        recipe=data.get("recipe", "classify"),
    )
    recipe_config(grid.recipe)
    if grid.recipe != "classify" and grid.goals:
        raise ValueError(f"{path}: [[goals]] are supported for classification grids only, not recipe {grid.recipe!r}")
    grid.cells(full=True)  # validates every setting now, not an hour into the run
    return grid

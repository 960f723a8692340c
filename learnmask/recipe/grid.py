"""Ablation grids: rows × grid axes (target sparsities) × seeds over shared defaults, parsed from
TOML and validated cell by cell; which run config the cells are comes from the grid's recipe
(:mod:`learnmask.recipe.registry`)."""
from __future__ import annotations

import dataclasses
import itertools
import os
import pathlib
import string
import tomllib
from importlib.resources.abc import Traversable
from typing import Any

from learnmask.recipe.registry import get_recipe, recipe_names


@dataclasses.dataclass(frozen=True)
class GridRow:
    """One row of an ablation table: a label and the run settings it overrides."""

    label: str
    settings: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class GridConfig:
    """An ablation grid: rows × grid axes × seeds, over shared defaults.

    TOML layout::

        name = "heads"
        title = "... ({test_size:,} held-out questions)"  # {field}: the cells' own value
        seeds = [0]            # default run
        full_seeds = [0, 1, 2] # with --full
        recipe = "classify"    # a registered recipe (default)
        [defaults]             # any field of the recipe's run config
        epochs = 2
        [[rows]]
        label = "hard-concrete + Lagrangian"
        method = "hard_concrete"
        target_sparsity = [0.5, 0.9]   # a list on a grid axis expands into one cell per value
    """

    name: str
    seeds: tuple[int, ...]
    full_seeds: tuple[int, ...]
    defaults: dict[str, Any]
    rows: tuple[GridRow, ...]
    title: str = ""
    goals: tuple[dict[str, Any], ...] = ()
    columns: tuple[str, ...] = ()
    recipe: str = "classify"

    def config_class(self) -> type:
        """The run-config class of this grid's cells."""
        return get_recipe(self.recipe).config_class()

    def cells(self, *, full: bool = False, overrides: dict[str, Any] | None = None) -> list[tuple[str, Any]]:
        """Every (row label, run config) of the grid in a fixed order: rows, then axis values,
        then seeds.

        Raises:
            ValueError: an override of the seeds or a grid axis, or a setting that the run
                config rejects (named with its row).
        """
        config = self.config_class()
        axes = tuple(getattr(config, "GRID_AXES", ()))
        fixed = sorted({"seed", *axes} & set(overrides or {}))
        if fixed:
            raise ValueError(f"{fixed} are set by the grid (seeds, full_seeds{' and each row' if axes else ''}), "
                             "not by --set; edit the grid file or pass --grid-file")
        cells = []
        for row in self.rows:
            settings = {**self.defaults, **row.settings, **(overrides or {})}
            named = [axis for axis in axes if axis in settings]
            values = [_as_list(settings.pop(axis)) for axis in named]
            where = f"grid {self.name!r}, row {row.label!r}"
            for combination in itertools.product(*values, self.full_seeds if full else self.seeds):
                chosen = dict(zip(named, combination[:-1]))
                cell = config.from_dict({**settings, **chosen, "seed": combination[-1]}, where=where)
                cells.append((row.label, cell))
        return cells

    def title_for(self, configs: list[Any]) -> str:
        """The title with each ``{field}`` (format spec allowed) filled from ``configs``; a field
        whose value differs between them shows every value, joined by ``/``."""
        parts = []
        for text, field, spec, _ in string.Formatter().parse(self.title):
            parts.append(text)
            if field is not None:
                values = sorted({getattr(cfg, field) for cfg in configs}, key=str)
                parts.append("/".join(format(value, spec) for value in values) if values else f"{{{field}}}")
        return "".join(parts)


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


GRID_KEYS = {"name", "title", "seeds", "full_seeds", "defaults", "rows", "goals", "columns", "recipe"}
#: A trade-off goal: some row other than ``versus`` gains at least ``min_gain`` on ``gain_metric``
#: while losing at most ``max_loss`` on ``loss_metric`` (means over seeds, minus the ``versus``
#: row's; optional ``versus_target``: which of its cells). Checked by the recipes whose tables
#: know it (:func:`learnmask.recipe.interference_table.check_trade_off`).
TRADE_OFF_FORM = frozenset({"description", "versus", "min_gain", "gain_metric", "max_loss", "loss_metric"})
GOAL_FORMS = (
    {"description", "row", "target", "versus", "versus_target", "min_difference"},
    {"description", "row", "target", "versus", "versus_target", "max_difference"},
    {"description", "row", "target", "max"},
    {"description", "row", "target", "min"},
    set(TRADE_OFF_FORM),
    {*TRADE_OFF_FORM, "versus_target"},
)


def _check_goals(path, goals: list, labels: set[str]) -> tuple[dict, ...]:
    for number, goal in enumerate(goals, start=1):
        keys = set(goal) - {"metric"}
        if keys not in GOAL_FORMS:
            forms = " or ".join(str(sorted(form)) for form in GOAL_FORMS)
            raise ValueError(f"{path}: goal {number} has keys {sorted(goal)}; "
                             f"expected {forms} (plus optional 'metric', except in a trade-off goal)")
        for key in ("row", "versus"):
            if key in goal and goal[key] not in labels:
                raise ValueError(f"{path}: goal {number} names row {goal[key]!r}; rows are {sorted(labels)}")
        if TRADE_OFF_FORM <= keys:
            _check_trade_off(f"{path}: goal {number}", goal)
    return tuple(goals)


def _check_trade_off(where: str, goal: dict) -> None:
    if "metric" in goal:
        raise ValueError(f"{where} is a trade-off goal: it names gain_metric and loss_metric, not metric")
    for key in ("gain_metric", "loss_metric"):
        if not isinstance(goal[key], str):
            raise ValueError(f"{where}: {key} = {goal[key]!r}; expected a metric's name (a string)")
    for key in ("min_gain", "max_loss"):
        value = goal[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: {key} = {value!r}; expected a number of points")
    if goal["max_loss"] < 0:
        raise ValueError(f"{where}: max_loss = {goal['max_loss']!r}; expected >= 0 (the most the row may lose)")


def _check_title(path, grid: GridConfig) -> None:
    known = {field.name for field in dataclasses.fields(grid.config_class())}
    for _, field, _, _ in string.Formatter().parse(grid.title):
        if field is not None and field not in known:
            raise ValueError(f"{path}: the title names {{{field}}}, which is not a setting of the "
                             f"{grid.recipe!r} recipe; known: {sorted(known)}")
    try:
        grid.title_for([cfg for _, cfg in grid.cells(full=True)])
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: cannot fill the title {grid.title!r}: {error}") from error


def _read(path: str | os.PathLike | Traversable) -> tuple[dict, str]:
    source = path if isinstance(path, Traversable) else pathlib.Path(path)
    if source.is_dir() or not source.is_file():
        what = "is a folder" if source.is_dir() else "not found"
        raise FileNotFoundError(f"grid file {path} {what}; pass --grid-file PATH to a grid TOML file, or a bundled "
                                "grid's name")
    try:
        return tomllib.loads(source.read_text(encoding="utf-8")), pathlib.PurePath(str(path)).stem
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path} is not valid TOML: {error}") from error
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not a UTF-8 text file: {error}") from error


def load_grid(path: str | os.PathLike | Traversable) -> GridConfig:
    """Parse and validate a grid TOML file (every cell is built once to check it).

    Args:
        path: a file path, or a bundled grid (:func:`learnmask.recipe.registry.bundled_grid`).

    Raises:
        FileNotFoundError: no such file (or a folder).
        ValueError: TOML syntax, unknown keys (top level, defaults or rows), a row without a
            label, an unknown recipe, a title field that is no setting, or an invalid setting.
    """
    data, stem = _read(path)
    unknown = sorted(set(data) - GRID_KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} at the top of {path}; known keys: {sorted(GRID_KEYS)}")
    rows = []
    for number, row in enumerate(data.get("rows", []), start=1):
        if "label" not in row:
            raise ValueError(f"{path}: row {number} has no 'label'")
        rows.append(GridRow(row["label"], {k: v for k, v in row.items() if k != "label"}))
    if not rows:
        raise ValueError(f"{path} defines no [[rows]]")
    grid = GridConfig(
        name=data.get("name", stem), seeds=tuple(data.get("seeds", [0])),
        full_seeds=tuple(data.get("full_seeds", data.get("seeds", [0]))), defaults=dict(data.get("defaults", {})),
        rows=tuple(rows), title=data.get("title", data.get("name", stem)),
        goals=_check_goals(path, data.get("goals", []), {row.label for row in rows}),
        columns=tuple(data.get("columns", [])), recipe=data.get("recipe", "classify"),
    )
    try:
        recipe = get_recipe(grid.recipe)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    if grid.goals and not recipe.goals:
        raise ValueError(f"{path}: [[goals]] are not checked by the tables of recipe {grid.recipe!r}; recipes that "
                         f"check them: {[name for name in recipe_names() if get_recipe(name).goals]}")
    grid.cells(full=True)  # validates every setting now, not an hour into the run
    _check_title(path, grid)
    return grid

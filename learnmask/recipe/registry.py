"""Recipes and bundled grids by name: what ``recipe = "..."`` in a grid file and
``learnmask reproduce <grid>`` mean, in one place.

A :class:`Recipe` names, as ``"module:attribute"`` strings imported on first use (so listing
recipes or parsing a grid loads no model code): its run-config class, the function that runs
one config, the function that writes a grid's tables and the one that draws its figure. Users
add their own with :func:`register_recipe`.

Bundled grids are TOML files shipped inside the package (``learnmask/grids/*.toml``, package
data), so an installed ``learnmask`` finds them from any folder; a grid of your own is passed
by path (``--grid-file``).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.resources
from importlib.resources.abc import Traversable
from typing import Any, Callable


def _resolve(target: str) -> Any:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One kind of run that a grid can be made of.

    Attributes:
        name: what a grid file's ``recipe = "..."`` says.
        config: ``"module:Class"`` of its run config (a :class:`ValidatedConfig`; its
            ``GRID_AXES`` fields may be lists in a grid row).
        fit: ``"module:function"`` with the signature ``fit(cfg, run_dir, *, cache_dir,
            progress=None, record=None) -> dict`` (metrics; ``record(metrics)`` is called before
            the run's checkpoint is deleted).
        tables: ``"module:function"``: ``write(grid, records, out_stem, *, title, command)``
            writes ``<out_stem>.md`` and ``.tex`` and returns the rows (ValueError: no results).
        figure: ``"module:function"``: ``plot(records, path, *, title) -> bool`` (False: nothing
            to draw, or matplotlib missing).
        goals: whether its tables check a grid's ``[[goals]]``
            (:func:`learnmask.recipe.table.check_goals`); a grid with goals needs it.
    """

    name: str
    config: str
    fit: str
    tables: str
    figure: str
    goals: bool = False

    def config_class(self) -> type:
        """The run-config class."""
        return _resolve(self.config)

    def fit_function(self) -> Callable[..., dict]:
        """The function that runs one config (looked up at each call, so tests may patch it)."""
        return _resolve(self.fit)

    def tables_function(self) -> Callable[..., list]:
        """The function that writes a grid's tables."""
        return _resolve(self.tables)

    def figure_function(self) -> Callable[..., bool]:
        """The function that draws a grid's figure."""
        return _resolve(self.figure)


_RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    """Make ``recipe`` available to grid files as ``recipe = "<recipe.name>"``.

    Raises:
        ValueError: a recipe of that name is registered already.
    """
    if recipe.name in _RECIPES:
        raise ValueError(f"recipe {recipe.name!r} is registered already; pick another name")
    _RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    """The recipe registered as ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if name not in _RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {sorted(_RECIPES)}")
    return _RECIPES[name]


def recipe_names() -> list[str]:
    """Names of the registered recipes."""
    return sorted(_RECIPES)


register_recipe(Recipe("classify", "learnmask.recipe.config:RunConfig", "learnmask.recipe.train:fit",
                       "learnmask.recipe.table:write_tables", "learnmask.recipe.figures:plot_trajectories",
                       goals=True))
register_recipe(Recipe("mlm", "learnmask.recipe.mlm_config:MLMRunConfig", "learnmask.recipe.mlm:fit_mlm",
                       "learnmask.recipe.mlm_table:write_mlm_tables", "learnmask.recipe.mlm_table:plot_rates"))
register_recipe(Recipe("tokens", "learnmask.recipe.token_config:TokenRunConfig", "learnmask.recipe.tokens:fit_tokens",
                       "learnmask.recipe.token_table:write_token_tables",
                       "learnmask.recipe.token_table:plot_accuracy_vs_speed", goals=True))
register_recipe(Recipe("interference", "learnmask.recipe.interference_config:InterferenceRunConfig",
                       "learnmask.recipe.interference:fit_interference",
                       "learnmask.recipe.interference_table:write_interference_tables",
                       "learnmask.recipe.interference_table:plot_interference", goals=True))


def grids_folder() -> Traversable:
    """The folder of the bundled grid files inside the installed package."""
    return importlib.resources.files("learnmask") / "grids"


def bundled_grids() -> dict[str, Traversable]:
    """Bundled grid name (the file's stem) -> its TOML file."""
    folder = grids_folder()
    if not folder.is_dir():
        return {}
    return {entry.name[: -len(".toml")]: entry for entry in folder.iterdir() if entry.name.endswith(".toml")}


def bundled_grid(name: str) -> Traversable:
    """The TOML file of the bundled grid ``name``.

    Raises:
        ValueError: no bundled grid of that name (the message lists them and names ``--grid-file``).
    """
    grids = bundled_grids()
    if name not in grids:
        raise ValueError(f"no bundled grid {name!r}; bundled grids are {sorted(grids)}; "
                         "pass --grid-file PATH for a grid of your own")
    return grids[name]

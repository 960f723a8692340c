"""The grid runner: every cell of an ablation grid once, resumable, shardable.

A cell is finished when ``results.jsonl`` holds a record with its key (a hash of its whole
config); finished cells are never run again or overwritten. A cell interrupted mid-way resumes
from its last epoch checkpoint under ``work_dir/run-<key>/``.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import pathlib

from learnmask.io import append_jsonl, read_jsonl
from learnmask.recipe.config import GridConfig, RunConfig
from learnmask.recipe.train import fit

logger = logging.getLogger(__name__)


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → ``(i, n)`` with ``0 <= i < n``.

    Raises:
        ValueError: anything else, naming the expected form.
    """
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError as error:
        raise ValueError(f"--shard must look like i/n (say 0/2); got {text!r}") from error
    if not 0 <= index < count:
        raise ValueError(f"--shard i/n needs 0 <= i < n; got {text!r}")
    return index, count


def pending_cells(grid: GridConfig, results_path, *, full=False, shard=(0, 1), overrides=None):
    """Cells of this shard that have no record in ``results_path`` yet, in grid order."""
    done = {record["key"] for record in read_jsonl(results_path)}
    cells = grid.cells(full=full, overrides=overrides)[shard[0] :: shard[1]]
    return [(label, cfg) for label, cfg in cells if cfg.key() not in done]


def run_grid(
    grid: GridConfig,
    *,
    results_path: pathlib.Path,
    work_dir: pathlib.Path,
    full: bool = False,
    shard: tuple[int, int] = (0, 1),
    overrides: dict | None = None,
    show_progress: bool = True,
) -> list[dict]:
    """Run the pending cells of ``grid`` and append one record per finished cell.

    Returns:
        the records written by this call (one per cell run now).
    """
    todo = pending_cells(grid, results_path, full=full, shard=shard, overrides=overrides)
    logger.info("grid %s: %d cell(s) to run", grid.name, len(todo))
    written = []
    if not todo:
        return written
    bar = progress_bar(len(todo), show_progress, unit="cell")
    for label, cfg in todo:
        target = f" @ {cfg.target_sparsity:g}" if hasattr(cfg, "target_sparsity") else ""
        bar.set_description(f"{label}{target}, seed {cfg.seed}")
        steps = progress_bar(None, show_progress, leave=False, unit="step")
        metrics = _fit_of(grid.recipe)(cfg, work_dir / f"run-{cfg.key()}", cache_dir=work_dir / "cache", progress=steps)
        steps.close()
        record = _record(grid.name, label, cfg, metrics)
        append_jsonl(results_path, [record])
        written.append(record)
        bar.update(1)
    bar.close()
    return written


def _fit_of(recipe: str):
    """The function that runs one cell of a ``recipe`` grid (``fit`` for classification)."""
    if recipe == "mlm":
        from learnmask.recipe.mlm import fit_mlm

        return fit_mlm
    return fit


def _record(grid: str, label: str, cfg: RunConfig, metrics: dict) -> dict:
    return {
        "key": cfg.key(),
        "grid": grid,
        "row": label,
        "config": dataclasses.asdict(cfg),
        "metrics": metrics,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


class _NoBar:
    total = None

    def update(self, n=1):
        pass

    def set_description(self, text):
        pass

    def close(self):
        pass


def progress_bar(total, show: bool, **kwargs):
    """A tqdm bar, or a silent stand-in when ``show`` is false or tqdm is missing."""
    if not show:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, dynamic_ncols=True, **kwargs)

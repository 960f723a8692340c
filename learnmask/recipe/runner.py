"""The grid runner: every cell of an ablation grid once, resumable, shardable, safe to run from
several processes at once.

Under ``torchrun`` every rank runs the same cells together (DDP, see
:mod:`learnmask.distributed`): rank 0 picks the pending cells, claims each one and writes its
record; the other ranks follow its decisions. ``--shard`` still splits a grid across machines
(or across independent torchrun groups).

A cell is finished when ``results.jsonl`` holds a record with its key (a hash of its whole
config); finished cells are never run again or overwritten. A process claims a cell before
training it (a lock file that the kernel releases when the process ends, however it ends), so
two processes on one grid never train the same cell; it checks again under the results lock
before writing. A cell interrupted mid-way resumes from its last checkpoint under
``work_dir/run-<key>/``; the checkpoint is deleted only after the record is written.
"""
from __future__ import annotations

import contextlib
import logging
import pathlib

from learnmask import distributed
from learnmask.io import claim
from learnmask.recipe.grid import GridConfig
from learnmask.recipe.registry import get_recipe
from learnmask.recipe.results import (
    ResultNotWritten,
    append_result,
    check_writable,
    claim_file,
    finished_keys,
    make_record,
)

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
    """Cells of this shard that have no record in ``results_path`` yet, in grid order (under DDP:
    as rank 0 reads the results file)."""
    done = distributed.broadcast_object(finished_keys(results_path) if distributed.is_main() else None)
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
        the records written by this call (one per cell run now; cells another process holds
        are left to it).

    Raises:
        NotWritable: the results file or work folder cannot be written (before any training).
        ResultNotWritten: a finished cell could not be recorded (its checkpoint is kept).
        ValueError, FileNotFoundError: from the configs, data, models or a failed run.
    """
    results_path, work_dir = pathlib.Path(results_path), pathlib.Path(work_dir)
    distributed.on_main(_check_writable, results_path, work_dir)
    todo = pending_cells(grid, results_path, full=full, shard=shard, overrides=overrides)
    logger.info("grid %s: %d cell(s) to run", grid.name, len(todo))
    written = []
    if not todo:
        return written
    show_progress = show_progress and distributed.is_main()
    bar = progress_bar(len(todo), show_progress, unit="cell")
    try:
        for label, cfg in todo:
            target = f" @ {cfg.target_sparsity:g}" if hasattr(cfg, "target_sparsity") else ""
            bar.set_description(f"{label}{target}, seed {cfg.seed}")
            record = run_cell(grid, label, cfg, results_path=results_path, work_dir=work_dir,
                              show_progress=show_progress)
            if record is not None:
                written.append(record)
            bar.update(1)
    finally:
        bar.close()
    return written


def run_cell(grid: GridConfig, label: str, cfg, *, results_path: pathlib.Path, work_dir: pathlib.Path,
             show_progress: bool = False) -> dict | None:
    """Claim, train and record one cell; None when another process holds it or finished it (under
    DDP rank 0 claims and decides for every rank, and writes the record)."""
    key = cfg.key()
    main = distributed.is_main()
    with claim(claim_file(results_path, key)) if main else contextlib.nullcontext(True) as mine:
        if main and not mine:
            logger.warning("cell %r (run %s) is being trained by another process; left to it", label, key)
        # finished by another process since we looked?
        if not distributed.broadcast_object(bool(mine) and (not main or key not in finished_keys(results_path))):
            return None
        run_dir = work_dir / f"run-{key}"
        written = []

        def record(metrics: dict) -> None:
            if not main:  # rank 0 writes the record
                return
            entry = make_record(grid.name, label, cfg, metrics)
            try:
                if append_result(results_path, entry):
                    written.append(entry)
            except OSError as error:
                raise ResultNotWritten(f"run {key} finished but could not be recorded in {results_path} "
                                       f"({error.strerror or error}); its checkpoint stays in {run_dir}: run the same "
                                       "command again to record it without training again") from error

        steps = progress_bar(None, show_progress and main, leave=False, unit="step")
        try:
            get_recipe(grid.recipe).fit_function()(cfg, run_dir, cache_dir=work_dir / "cache", progress=steps,
                                                   record=record)
        finally:
            steps.close()
        return written[0] if written else None


def _check_writable(results_path: pathlib.Path, work_dir: pathlib.Path) -> None:
    check_writable(results_path)
    check_writable(work_dir, what="checkpoints", folder=True)


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

"""The ``learnmask`` command: ``run`` one config, ``reproduce`` an ablation grid, ``table``,
``paper`` (refresh or check ``paper/paper.md`` against the tables).

Grids are found by name among the bundled ones (package data, so any folder works) or by path
(``--grid-file``); what runs them and writes their tables comes from the grid's recipe
(:mod:`learnmask.recipe.registry`).

``run`` and ``reproduce`` scale out under ``torchrun`` (``torchrun --nproc-per-node 2 -m learnmask
run config.toml``): every rank trains the same run with DDP, rank 0 writes (see
:mod:`learnmask.distributed`).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import logging
import pathlib
import re
import shlex
import sys
import time
import tomllib


def parse_overrides(pairs: list[str]) -> dict:
    """``["epochs=1", "freeze=[]"]`` → ``{"epochs": 1, "freeze": []}`` (values are TOML).

    Raises:
        ValueError: a pair without ``=`` or a value that is not TOML.
    """
    values = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value; got {pair!r}")
        try:
            values[key.strip()] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            values[key.strip()] = text  # a bare word is a string
    return values


def table_name(grid: str, *, full: bool, overrides: dict) -> str:
    """File stem of a grid's table: ``<grid>[-full]``, plus ``@key=value,...`` for overridden runs,
    so that a smoke run never replaces the table of the grid as written."""
    name = grid + ("-full" if full else "")
    if not overrides:
        return name
    text = ",".join(f"{key}={_compact(value)}" for key, value in sorted(overrides.items()))
    text = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)
    if len(text) > 80:
        text = text[:70] + "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{name}@{text}"


def _compact(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _parser() -> argparse.ArgumentParser:
    from learnmask.recipe.registry import bundled_grids

    names = ", ".join(sorted(bundled_grids()))
    parser = argparse.ArgumentParser(prog="learnmask", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one config and print its metrics as JSON (TOML: the config's keys; "
                         "recipe = \"tokens\", \"mlm\" or \"interference\" picks a recipe other than classify)")
    run.add_argument("config", type=pathlib.Path)
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    run.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/single"), help="run folder")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    _distributed_options(run)
    rep = sub.add_parser("reproduce", help="run an ablation grid (resumable) and write its table")
    rep.add_argument("grid", nargs="?", help=f"a bundled grid ({names}); or give --grid-file")
    _grid_options(rep)
    rep.add_argument("--shard", default="0/1", help="run only cells i, i+n, ... of the grid: i/n")
    rep.add_argument("--no-progress", action="store_true", help="no progress bars")
    _distributed_options(rep)
    tab = sub.add_parser("table", help="write the table of a grid's results (Markdown and LaTeX)")
    tab.add_argument("grid", nargs="?", help=f"a bundled grid ({names}); or give --grid-file")
    _grid_options(tab)
    pap = sub.add_parser("paper", help="refresh the tables included in paper/paper.md; --check: only check it")
    pap.add_argument("paper", nargs="?", type=pathlib.Path, default=pathlib.Path("paper/paper.md"),
                     help="the paper's Markdown (default: paper/paper.md); its tables and results are "
                          "<its folder>/tables and /results")
    pap.add_argument("--check", action="store_true",
                     help="write nothing; exit 1 if an included table is stale, a table differs from its "
                          "regeneration from the results, a quoted number differs from its cell, or a "
                          "decimal number in the prose is unmarked")
    return parser


def _distributed_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=["gloo", "nccl"], default=None,
                        help="process-group backend under torchrun (default: gloo, since learnmask's recipes train on "
                             "CPU; nccl needs CUDA)")


def _grid_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid-file", type=pathlib.Path, help="a grid TOML of your own (default: the bundled grid)")
    parser.add_argument("--results", type=pathlib.Path, help="results JSON lines (default: runs/<grid>/results.jsonl)")
    parser.add_argument("--work-dir", type=pathlib.Path, help="checkpoints, caches, TensorBoard (default: runs/<grid>)")
    parser.add_argument("--tables-dir", type=pathlib.Path,
                        help="where the tables go (default: paper/tables; with --set: <work-dir>/tables, "
                             "and the table's name carries the overrides); figures go to <tables-dir>/../figures")
    parser.add_argument("--full", action="store_true",
                        help="all seeds of the grid (full_seeds) instead of the quick default; table <grid>-full.md")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key in every cell")


def _paths(args):
    from learnmask.recipe.grid import load_grid
    from learnmask.recipe.registry import bundled_grid

    if args.grid is None and args.grid_file is None:
        raise ValueError(f"name a grid or pass --grid-file; bundled grids: {_bundled_names()}")
    grid = load_grid(args.grid_file or bundled_grid(args.grid))
    if args.grid is not None and grid.name != args.grid:
        raise ValueError(f"{args.grid_file} defines grid {grid.name!r}, not {args.grid!r}")
    work = args.work_dir or pathlib.Path("runs") / grid.name
    return grid, args.results or work / "results.jsonl", work


def _bundled_names() -> list[str]:
    from learnmask.recipe.registry import bundled_grids

    return sorted(bundled_grids())


@dataclasses.dataclass(frozen=True)
class GridTables:
    """What :func:`write_grid_tables` wrote: ``<stem>.md`` and ``<stem>.tex`` (a recipe may write
    more pages beside them, named ``<stem>-*``), from ``records``, headed by ``command``."""

    stem: pathlib.Path
    title: str
    command: str  # as written at the top of the tables (with the PARTIAL note, if any)
    records: list
    summaries: list


def write_grid_tables(args, grid, results: pathlib.Path, work: pathlib.Path, command: str) -> GridTables:
    """Write the tables of exactly the cells ``args`` selects (seeds, overrides), nothing else.

    ``command`` is written at the top of each table, with a PARTIAL note when runs are missing.
    """
    from learnmask.recipe.registry import get_recipe
    from learnmask.recipe.results import read_results

    overrides = parse_overrides(args.set)
    configs = [cfg for _, cfg in grid.cells(full=args.full, overrides=overrides)]
    keys = {cfg.key() for cfg in configs}
    records = [record for record in read_results(results) if record["key"] in keys]
    missing = len(keys - {record["key"] for record in records})
    if missing:
        command += f" (PARTIAL: {missing} of {len(keys)} runs not finished; rerun to complete)"
        print(f"learnmask: warning: {missing} of {len(keys)} runs of this table are not finished yet", file=sys.stderr)
    tables = args.tables_dir or (work / "tables" if overrides else pathlib.Path("paper/tables"))
    stem = tables / table_name(grid.name, full=args.full, overrides=overrides)
    title = grid.title_for(configs)
    summaries = get_recipe(grid.recipe).tables_function()(grid, records, stem, title=title, command=command)
    return GridTables(stem, title, command, records, summaries)


def _table(args, grid, results, work, command: str) -> None:
    """Tabulate exactly the cells this command selects, draw the figure and name every file written."""
    from learnmask.recipe.registry import get_recipe

    started = time.time() - 1.0  # (file times may be coarser than this clock)
    written = write_grid_tables(args, grid, results, work, command)
    stem, tables = written.stem, written.stem.parent
    print(stem.with_suffix(".md").read_text())
    print(f"wrote {stem}.md and {stem}.tex ({len(written.summaries)} rows) from {results}")
    figure = tables.parent / "figures" / f"{stem.name}.png"
    plot = get_recipe(grid.recipe).figure_function()
    if plot(written.records, figure, title=f"{written.title} ({written.command})"):
        print(f"wrote {figure}")
    named = {stem.with_suffix(".md"), stem.with_suffix(".tex"), figure}
    for folder in (tables, figure.parent):  # what else the recipe wrote beside them (its own pages)
        for extra in sorted(folder.glob(f"{glob.escape(stem.name)}-*")) if folder.is_dir() else ():
            if extra not in named and extra.stat().st_mtime >= started:
                print(f"wrote {extra}")


def _read_toml(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path} is not valid TOML: {error}") from error


def _printable(metrics: dict) -> dict:
    """Metrics for the console: head masks as one string per layer; trajectories, importance
    scores and the token runs' pictured kept tokens left out (they stay in the metrics file)."""
    shown = {k: v for k, v in metrics.items() if k not in ("trajectory", "importance", "kept_tokens_pictured")}
    if shown.get("head_mask"):
        shown["head_mask"] = ["".join(str(v) for v in row) for row in shown["head_mask"]]
    return shown


def _finished(done: pathlib.Path) -> dict:
    try:
        return json.loads(done.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{done} is not a learnmask result ({error}); delete it to run again") from error


def _run(args) -> None:
    """``learnmask run``: one config; a finished run is reported, not trained again."""
    from learnmask import distributed
    from learnmask.io import atomic_write_text
    from learnmask.recipe.registry import get_recipe
    from learnmask.recipe.results import ResultNotWritten, check_writable
    from learnmask.recipe.runner import progress_bar

    values = {**_read_toml(args.config), **parse_overrides(args.set)}
    name = values.pop("recipe", "classify")
    if not isinstance(name, str):
        raise ValueError(f"{args.config}: recipe must be a recipe's name (a string); got {name!r}")
    recipe = get_recipe(name)
    cfg = recipe.config_class().from_dict(values, where=str(args.config))
    fit = recipe.fit_function()
    run_dir = args.out / f"run-{cfg.key()}"
    done = run_dir / "metrics.json"
    if distributed.broadcast_object(done.exists()):
        print(f"learnmask: {run_dir} already finished; delete it to run again", file=sys.stderr)
        result = _finished(done)
    else:
        distributed.on_main(check_writable, done, what="the run's metrics")
        if (run_dir / "checkpoint.pt").exists() and distributed.is_main():
            print(f"learnmask: resuming {run_dir} from its last checkpoint", file=sys.stderr)
        result = {"recipe": name, "config": dataclasses.asdict(cfg)}

        def record(metrics: dict) -> None:
            try:
                atomic_write_text(done, json.dumps({**result, "metrics": metrics}, indent=1) + "\n")
            except OSError as error:
                raise ResultNotWritten(
                    f"the run finished but {done} could not be written ({error.strerror or error}); "
                    f"its checkpoint stays in {run_dir}: run the same command again to record it"
                ) from error

        bar = progress_bar(None, not args.no_progress and distributed.is_main(), unit="step")
        try:
            result["metrics"] = fit(cfg, run_dir, cache_dir=args.out / "cache", progress=bar, record=record)
        finally:
            bar.close()
    if distributed.is_main():
        print(json.dumps({"config": result["config"], "metrics": _printable(result["metrics"])}, indent=2))
        print(f"learnmask: all metrics in {done}", file=sys.stderr)


def _paper(args) -> int:
    """``learnmask paper``: refresh the includes (unless --check), then check everything."""
    from learnmask.paper.build import build, check

    if not args.paper.is_file():
        raise FileNotFoundError(f"{args.paper} not found; run from the checkout or name the paper's Markdown")
    if not args.check:
        files = build(args.paper)
        print(f"refreshed {len(files)} included files in {args.paper}")
    problems = check(args.paper, root=args.paper.resolve().parent.parent)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"learnmask: {len(problems)} problems in {args.paper}", file=sys.stderr)
        return 1
    print(f"{args.paper}: includes fresh, tables equal to their regeneration, every quote equal to its source")
    return 0


def _os_message(error: OSError) -> str:
    """One line for an OSError: its own message for learnmask's, else the reason and the file."""
    if error.strerror is None:
        return str(error)
    where = f": {error.filename}" if error.filename else ""
    return (f"{error.strerror}{where} (check the folder's permissions and free space, "
            "or choose another --results/--work-dir/--out)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``learnmask`` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    command = "learnmask " + shlex.join(argv)
    finished = False
    try:
        if args.command in ("run", "reproduce"):
            from learnmask import distributed

            distributed.init_from_environment(args.backend)
        if args.command == "run":
            _run(args)
        elif args.command == "paper":
            return _paper(args)
        elif args.command == "reproduce":
            from learnmask.recipe.runner import parse_shard, run_grid

            grid, results, work = _paths(args)
            shard = parse_shard(args.shard)
            run_grid(grid, results_path=results, work_dir=work, full=args.full, shard=shard,
                     overrides=parse_overrides(args.set), show_progress=not args.no_progress)
            distributed.on_main(_table, args, grid, results, work, command)
        else:
            grid, results, work = _paths(args)
            _table(args, grid, results, work, command)
        finished = True
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"learnmask: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"learnmask: error: {_os_message(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("learnmask: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    except RuntimeError as error:
        from learnmask.distributed import RankFailed

        if not isinstance(error, RankFailed):
            raise
        print(f"learnmask: error: {error}", file=sys.stderr)
        return 2
    finally:
        from learnmask import distributed

        distributed.end(wait=finished)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``learnmask`` command: ``run`` one config, ``reproduce`` an ablation grid, ``table``."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import sys
import shlex
import tomllib

from learnmask.io import read_jsonl

GRIDS = {"heads": "experiments/grids/heads.toml", "controllers": "experiments/grids/controllers.toml",
         "mlm": "experiments/grids/mlm.toml"}


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="learnmask", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one config (TOML with RunConfig keys) and print its metrics as JSON")
    run.add_argument("config", type=pathlib.Path)
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    run.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/single"), help="run folder")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    rep = sub.add_parser("reproduce", help="run an ablation grid (resumable) and write its table under paper/")
    rep.add_argument("grid", choices=sorted(GRIDS), help="which table")
    _grid_options(rep)
    rep.add_argument("--shard", default="0/1", help="run only cells i, i+n, ... of the grid: i/n")
    rep.add_argument("--no-progress", action="store_true", help="no progress bars")
    tab = sub.add_parser("table", help="write the table of a grid's results (Markdown and LaTeX)")
    tab.add_argument("grid", choices=sorted(GRIDS))
    _grid_options(tab)
    return parser


def _grid_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid-file", type=pathlib.Path, help="grid TOML (default: experiments/grids/<grid>.toml)")
    parser.add_argument("--results", type=pathlib.Path, help="results JSON lines (default: runs/<grid>/results.jsonl)")
    parser.add_argument("--work-dir", type=pathlib.Path, help="checkpoints, caches, TensorBoard (default: runs/<grid>)")
    parser.add_argument("--tables-dir", type=pathlib.Path, default=pathlib.Path("paper/tables"), help="where the table goes")
    parser.add_argument("--full", action="store_true",
                        help="all seeds of the grid (full_seeds) instead of the quick default; table <grid>-full.md")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key in every cell")


def _paths(args):
    from learnmask.recipe.config import load_grid

    grid = load_grid(args.grid_file or pathlib.Path(GRIDS[args.grid]))
    if grid.name != args.grid:
        raise ValueError(f"{args.grid_file} defines grid {grid.name!r}, not {args.grid!r}")
    work = args.work_dir or pathlib.Path("runs") / grid.name
    return grid, args.results or work / "results.jsonl", work


def _table(args, grid, results, command: str) -> None:
    """Tabulate exactly the cells this command selects (seeds, overrides), nothing else."""
    from learnmask.recipe.table import write_tables

    keys = {cfg.key() for _, cfg in grid.cells(full=args.full, overrides=parse_overrides(args.set))}
    records = [record for record in read_jsonl(results) if record["key"] in keys]
    missing = len(keys - {record["key"] for record in records})
    if missing:
        command += f" (PARTIAL: {missing} of {len(keys)} runs not finished; rerun to complete)"
        print(f"learnmask: warning: {missing} of {len(keys)} runs of this table are not finished yet", file=sys.stderr)
    stem = args.tables_dir / (grid.name + ("-full" if args.full else ""))
    if grid.recipe == "mlm":
        return _mlm_table(args, grid, records, stem, results, command)
    summaries = write_tables(grid, records, stem, title=grid.title, command=command, goals=grid.goals)
    print(stem.with_suffix(".md").read_text())
    print(f"wrote {stem}.md and {stem}.tex ({len(summaries)} rows) from {results}")
    from learnmask.recipe.figures import plot_trajectories

    figure = args.tables_dir.parent / "figures" / f"{stem.name}.png"
    if plot_trajectories(records, figure, title=f"{grid.title} ({command})"):
        print(f"wrote {figure}")


def _mlm_table(args, grid, records, stem, results, command: str) -> None:
    """The masking-rate table and the rate-trajectory figure of an MLM grid."""
    from learnmask.recipe.mlm_table import plot_rates, write_mlm_tables

    summaries = write_mlm_tables(grid, records, stem, title=grid.title, command=command)
    print(stem.with_suffix(".md").read_text())
    print(f"wrote {stem}.md and {stem}.tex ({len(summaries)} rows) from {results}")
    figure = args.tables_dir.parent / "figures" / f"{stem.name}.png"
    if plot_rates(records, figure, title=f"{grid.title} ({command})"):
        print(f"wrote {figure}")


def _read_toml(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path} is not valid TOML: {error}") from error


def _printable(metrics: dict) -> dict:
    """Metrics for the console: head masks as one string per layer, trajectories left out."""
    shown = {k: v for k, v in metrics.items() if k != "trajectory"}
    if shown.get("head_mask"):
        shown["head_mask"] = ["".join(str(v) for v in row) for row in shown["head_mask"]]
    return shown


def _run(args) -> None:
    """``learnmask run``: one config; a finished run is reported, not trained again."""
    from learnmask.io import atomic_write_text
    from learnmask.recipe.config import RunConfig
    from learnmask.recipe.runner import progress_bar
    from learnmask.recipe.train import fit

    cfg = RunConfig.from_dict({**_read_toml(args.config), **parse_overrides(args.set)}, where=str(args.config))
    run_dir = args.out / f"run-{cfg.key()}"
    done = run_dir / "metrics.json"
    if done.exists():
        print(f"learnmask: {run_dir} already finished; delete it to run again", file=sys.stderr)
        result = json.loads(done.read_text())
    else:
        if (run_dir / "checkpoint.pt").exists():
            print(f"learnmask: resuming {run_dir} from its last checkpoint", file=sys.stderr)
        bar = progress_bar(None, not args.no_progress, unit="step")
        metrics = fit(cfg, run_dir, cache_dir=args.out / "cache", progress=bar)
        bar.close()
        result = {"config": dataclasses.asdict(cfg), "metrics": metrics}
        atomic_write_text(done, json.dumps(result, indent=1) + "\n")
    print(json.dumps({"config": result["config"], "metrics": _printable(result["metrics"])}, indent=2))
    print(f"learnmask: all metrics in {done}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``learnmask`` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    command = "learnmask " + shlex.join(argv)
    try:
        if args.command == "run":
            _run(args)
        elif args.command == "reproduce":
            from learnmask.recipe.runner import parse_shard, run_grid

            grid, results, work = _paths(args)
            shard = parse_shard(args.shard)
            run_grid(grid, results_path=results, work_dir=work, full=args.full, shard=shard,
                     overrides=parse_overrides(args.set), show_progress=not args.no_progress)
            _table(args, grid, results, command)
        else:
            grid, results, _ = _paths(args)
            _table(args, grid, results, command)
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"learnmask: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("learnmask: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

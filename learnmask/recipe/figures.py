"""Figures of a grid's results (matplotlib, optional extra ``learnmask[figures]``)."""
from __future__ import annotations

import io
import pathlib
import sys

from learnmask.io import atomic_write_bytes


def plot_trajectories(records: list[dict], path: pathlib.Path, *, title: str) -> bool:
    """Expected sparsity vs. target over training steps, one panel per target, one line per row.

    Uses each (row, target)'s lowest seed. Written atomically as PNG.

    Returns:
        False (and writes nothing) when no record has a trajectory or matplotlib is missing.
    """
    chosen: dict[tuple[float, str], dict] = {}
    for record in sorted(records, key=lambda r: r["config"]["seed"]):
        if "trajectory" in record["metrics"]:
            chosen.setdefault((record["config"]["target_sparsity"], record["row"]), record["metrics"]["trajectory"])
    if not chosen:
        return False
    plt = pyplot()
    if plt is None:
        return False
    targets = sorted({target for target, _ in chosen})
    figure, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.4), sharey=True, squeeze=False)
    for ax, target in zip(axes[0], targets):
        for (t, row), trajectory in chosen.items():
            if t != target:
                continue
            steps = [i * trajectory["every"] for i in range(len(trajectory["sparsity"]))]
            ax.plot(steps, trajectory["sparsity"], label=row, linewidth=1.4)
        first = next(tr for (t, _), tr in chosen.items() if t == target)
        steps = [i * first["every"] for i in range(len(first["target"]))]
        ax.plot(steps, first["target"], "k--", linewidth=1, label="target")
        ax.set_title(f"target sparsity {target:g}")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("expected head sparsity")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    save_png(figure, path)
    return True


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or None when matplotlib is missing
    (said once, with how to install it: the tables are written without their figure)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        global _SAID_NO_MATPLOTLIB
        if not _SAID_NO_MATPLOTLIB:
            _SAID_NO_MATPLOTLIB = True
            print("learnmask: figures not written: matplotlib is not installed "
                  "(pip install 'learnmask[figures]' or pip install matplotlib)", file=sys.stderr)
        return None
    return plt


_SAID_NO_MATPLOTLIB = False


def save_png(figure, path: pathlib.Path) -> None:
    """Write ``figure`` as a 120-dpi PNG atomically and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())

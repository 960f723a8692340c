"""Diagnostic: how much does the choice of tokens matter to the image task's dense ViT at all?

The token grid's image rows compare learned gates with random patches after fine-tuning. This
script asks the question underneath, with no fine-tuning: take the dense ViT every image row of
``learnmask reproduce tokens`` starts from (its cached weights under ``--work-dir``, or trained
now exactly as the grid trains them), drop patches after layer 0 or 1 by a fixed rule, and score
all 10,000 Fashion-MNIST test images. Rules (``learnmask.recipe.token_baselines`` and two
pixel rules; CLS is always kept, every rule keeps exactly ``round(r * 50)`` tokens):

- ``random``: uniform random patches (the grid's random row, seeded);
- ``attention``: the patches CLS attends to most in the next layer (EViT-style);
- ``foreground``: the patches of highest mean pixel value (the garment; background is black);
- ``background``: the patches of lowest mean pixel value (the worst rule one can name).

If ``foreground`` and ``background`` score alike, which patches a learned scorer keeps cannot
matter much on this task, and "learned gates at least random" is a tie that noise decides.
Each difference against ``random`` comes with a 95% interval over test images (paired: the same
images, normal approximation of the per-image differences).

    python experiments/tokens_sensitivity.py               # seed 0, runs/tokens as the work dir
    python experiments/tokens_sensitivity.py --seed 1 --out /tmp/s.json

Results: ``paper/results/tokens-sensitivity.json`` (written atomically) and a Markdown table on
stdout; a line per setting on stderr as it goes. About 12 minutes on 2 cores (24 settings x 10,000
images) when the dense weights are cached, about 10 more to train them (it says so first).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learnmask.inject import apply_masks
from learnmask.inject.architectures import find_layers
from learnmask.io import atomic_write_text
from learnmask.recipe.grid import load_grid
from learnmask.recipe.registry import bundled_grid
from learnmask.recipe.token_baselines import AttentionReceivedScorer, RandomScorer
from learnmask.recipe.token_tasks import VIT, Examples, load_task
from learnmask.recipe.tokens import dense_path, dense_weights

ROOT = pathlib.Path(__file__).resolve().parents[1]
RULES = ("random", "attention", "foreground", "background")
LAYERS = (0, 1)
KEEP_RATIOS = (0.7, 0.5, 0.3)
BATCH = 500


class PixelScorer(nn.Module):
    """Scores each patch by its mean pixel value (``sign`` +1: brightest first, -1: darkest
    first), read from :attr:`pixels` ``(B, 1, H, W)``, which the caller sets before each batch."""

    def __init__(self, sign: float) -> None:
        super().__init__()
        self.sign, self.pixels = sign, None

    def forward(self, hidden: Tensor) -> Tensor:
        patches = F.avg_pool2d(self.pixels, VIT["patch_size"]).flatten(1)  # (B, 49)
        first = torch.zeros(len(patches), 1)  # CLS: kept by the eval rule whatever its score
        return self.sign * torch.cat([first, patches], dim=1)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="the grid seed whose dense ViT is probed (default 0)")
    parser.add_argument("--work-dir", type=pathlib.Path, default=ROOT / "runs" / "tokens",
                        help="the token grid's work dir; its cache/ holds the dense weights (default runs/tokens)")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "paper" / "results" / "tokens-sensitivity.json")
    return parser.parse_args(argv)


def dense_cell(seed: int):
    """The grid's keep-1.0 image cell of ``seed`` (its dense settings are every image row's)."""
    grid = load_grid(bundled_grid("tokens"))
    for label, cfg in grid.cells(full=True):
        if cfg.task == "fashion-vit" and cfg.method == "full" and cfg.seed == seed:
            return label, cfg
    raise ValueError(f"the bundled tokens grid has no keep-1.0 fashion-vit row for seed {seed} (its seeds: "
                     f"{sorted({cfg.seed for _, cfg in grid.cells(full=True)})})")


@torch.no_grad()
def correct(model: nn.Module, images: Tensor, labels: Tensor, scorer: nn.Module | None) -> Tensor:
    """``(N,)`` bool: which images ``model`` classifies right (with ``scorer`` on its pixels)."""
    model.eval()
    out = []
    for start in range(0, len(images), BATCH):
        pixels = images[start:start + BATCH]
        if isinstance(scorer, PixelScorer):
            scorer.pixels = pixels
        out.append(model(pixel_values=pixels).logits.argmax(-1) == labels[start:start + BATCH])
    return torch.cat(out)


def make_scorer(rule: str, model: nn.Module, layer: int, seed: int) -> nn.Module:
    """The scorer of ``rule`` (one of :data:`RULES`) for pruning after ``layer``."""
    if rule == "random":
        return RandomScorer(seed * 1000)
    if rule == "attention":
        return AttentionReceivedScorer(find_layers(model)[layer + 1])
    return PixelScorer(1.0 if rule == "foreground" else -1.0)


def probe(model: nn.Module, test: Examples, seed: int) -> list[dict]:
    """Accuracy of every rule at every pruning layer and keep ratio, and its paired difference
    against ``random`` (points, with a 95% interval)."""
    images, labels = test.inputs, test.labels
    rows = []
    for layer in LAYERS:
        for keep in KEEP_RATIOS:
            right = {}
            handle = apply_masks(model, heads=False, tokens=True, token_layers=[layer], token_keep_ratio=keep,
                                 token_gate="topk")
            try:
                for rule in RULES:
                    scorer = make_scorer(rule, model, layer, seed)
                    handle.tokens.scorers[0] = scorer
                    right[rule] = correct(model, images, labels, scorer)
            finally:
                handle.remove()
            print(f"after layer {layer}, keep {keep}: " + ", ".join(f"{r} {100 * float(right[r].double().mean()):.2f}%"
                                                                    for r in RULES), file=sys.stderr, flush=True)
            for rule in RULES:
                diff = right[rule].double() - right["random"].double()
                half = 1.96 * float(diff.std()) / len(diff) ** 0.5
                rows.append({"layer": layer, "keep_ratio": keep, "rule": rule,
                             "accuracy": 100 * float(right[rule].double().mean()),
                             "minus_random": 100 * float(diff.mean()), "minus_random_ci95": 100 * half})
    return rows


def check_out(out: pathlib.Path) -> None:
    """Refuse an ``--out`` that cannot become a file before any compute (``SystemExit``)."""
    if out.is_dir():
        raise SystemExit(f"tokens_sensitivity.py: --out {out} is a directory; expected a JSON file path")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise SystemExit(f"tokens_sensitivity.py: --out {out}: {parent} is a file, not a directory")


def load_dense(cfg, work_dir: pathlib.Path):
    """The task of ``cfg`` with its dense weights from ``work_dir/cache`` (trained there when
    missing, said first); a damaged or foreign cache file exits naming it (``SystemExit``)."""
    data = load_task(cfg)
    path = dense_path(cfg, work_dir / "cache")
    if not path.exists():
        print(f"no cached dense weights at {path}: training them as the grid does (about 10 minutes on 2 cores)",
              file=sys.stderr, flush=True)
    try:
        weights = dense_weights(cfg, data, work_dir / "cache")
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"tokens_sensitivity.py: {error}") from None
    try:
        data.model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as error:
        first = str(error).splitlines()[0]
        raise SystemExit(f"tokens_sensitivity.py: {path} does not hold the grid's dense ViT ({first}); delete it "
                         "to train it again") from None
    return data


def main(argv=None) -> int:
    args = parse_args(argv)
    check_out(args.out)
    try:
        label, cfg = dense_cell(args.seed)
    except ValueError as error:
        raise SystemExit(f"tokens_sensitivity.py: {error}") from None
    data = load_dense(cfg, args.work_dir)
    from learnmask.image_data import load_fashion_mnist

    images = load_fashion_mnist(cfg.dataset_path or None)
    test = Examples(images.test_images, images.test_labels)
    dense = 100 * float(correct(data.model, test.inputs, test.labels, None).double().mean())
    rows = probe(data.model, test, args.seed)
    command = ["python experiments/tokens_sensitivity.py", *(sys.argv[1:] if argv is None else argv)]
    result = {"command": " ".join(command),
              "grid_row": label, "seed": args.seed, "dense_key": cfg.dense_key(), "test_images": len(test),
              "dense_accuracy": dense, "rows": rows}
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"dense ViT (grid row {label!r}, seed {args.seed}): {dense:.2f}% on {len(test)} test images")
    print("| after layer | keep | " + " | ".join(RULES) + " | foreground − random | background − random |")
    print("|---:|---:|" + "---:|" * (len(RULES) + 2))
    for layer in LAYERS:
        for keep in KEEP_RATIOS:
            cell = {r["rule"]: r for r in rows if r["layer"] == layer and r["keep_ratio"] == keep}
            diffs = [f"{cell[r]['minus_random']:+.2f} ± {cell[r]['minus_random_ci95']:.2f}"
                     for r in ("foreground", "background")]
            print(f"| {layer} | {keep} | " + " | ".join(f"{cell[r]['accuracy']:.2f}" for r in RULES)
                  + " | " + " | ".join(diffs) + " |")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

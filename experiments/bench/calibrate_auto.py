"""Fit the CPU cost model behind ``masked_attention(backend="auto")`` and check the choices it makes.

Times the ``blocks`` and ``sdpa`` backends (and SDPA with a dense boolean mask) forward and forward
+ backward over S in {256, 512, 1024, 2048} and the four benchmark masks (B=2, H=8, D=64, fp32),
fits by non-negative least squares on relative error (``scipy.optimize.nnls``):

- ``blocks`` forward:  ``pairs * work / (gain * R_BLOCKS) + calls * C_CALL``
- ``blocks`` backward: ``BWD_BLOCKS * compute + calls * C_CALL_BWD``
- ``sdpa`` with a mask (non-causal masks; plain causal takes the is_causal fast path):
  forward ``dense_pairs * work / (gain * R_MASKED)``, backward ``BWD_SDPA`` times that

(``work`` = multiply-adds per pair, ``gain`` = the thread factor of learnmask.ops.attention), then
prints, for every case, the backend ``auto`` picks with the constants now in the library, its
time against the fastest of the two and against dense-mask SDPA. Usage::

    python experiments/bench/calibrate_auto.py            # about 3 minutes on 2 cores
    python experiments/bench/calibrate_auto.py --quick    # S in {256, 512}

Writes ``paper/results/auto-calibration.json`` (atomically).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import nnls

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import attention as bench  # noqa: E402  (the benchmark's masks)

from learnmask.io import atomic_write_text  # noqa: E402
from learnmask.ops import attention as auto  # noqa: E402
from learnmask.ops import (  # noqa: E402
    choose_backend,
    cost_model,  # noqa: E402
    masked_attention,
)
from learnmask.ops.inputs import prepare_inputs  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
B, H, D = bench.B, bench.H, bench.D


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _runner(call, grads: bool, params):
    def run():
        if grads:
            torch.autograd.grad(call().sum(), params)
        else:
            with torch.no_grad():
                call()
    return run


def measure(seq_lens: list[int], repeats: int) -> list[dict]:
    """One row per (S, mask): plan statistics, seconds of each contender, auto's picks."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for seq in seq_lens:
        for kind in bench.MASKS:
            mask, _, keep = bench.build_mask(kind, seq, gen)
            q, k, v = (torch.randn(B, H, seq, D, generator=gen, requires_grad=True) for _ in range(3))
            pairs, calls, chunks = auto._plan_stats(prepare_inputs(q, k, v, mask=mask))
            row = dict(S=seq, mask=kind, pairs=pairs, calls=calls, chunks=chunks, dense_pairs=B * seq * seq)
            contenders = {  # each bound to this iteration's tensors (the loop moves on after timing them)
                "blocks": lambda q=q, k=k, v=v, mask=mask: masked_attention(q, k, v, mask=mask, backend="blocks"),
                "sdpa": lambda q=q, k=k, v=v, mask=mask: masked_attention(q, k, v, mask=mask, backend="sdpa"),
                "sdpa_dense": lambda q=q, k=k, v=v, keep=keep: F.scaled_dot_product_attention(q, k, v, attn_mask=keep),
            }
            for grads, mode in ((False, "f"), (True, "fb")):
                for name, call in contenders.items():
                    row[f"{name}_{mode}"] = _median_seconds(_runner(call, grads, (q, k, v)), repeats)
                with torch.set_grad_enabled(grads):
                    row[f"auto_{mode}"] = choose_backend(q, k, v, mask=mask).name
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def _fit(design: list[list[float]], target: list[float]) -> np.ndarray:
    a, y = np.asarray(design, dtype=float), np.asarray(target, dtype=float)
    return nnls(a / y[:, None], np.ones_like(y))[0]  # minimise relative error


def fit(rows: list[dict]) -> dict:
    """The cost-model constants that fit ``rows`` best (see the module docstring)."""
    work, gain = H * 2 * D, cost_model.threads_gain()
    compute = [r["pairs"] * work / gain for r in rows]
    a, c = _fit([[p, r["calls"]] for p, r in zip(compute, rows)], [r["blocks_f"] for r in rows])
    fwd = [p * a + r["calls"] * c for p, r in zip(compute, rows)]
    bwd_b, c_bwd = _fit([[p * a, r["calls"]] for p, r in zip(compute, rows)],
                        [r["blocks_fb"] - f for r, f in zip(rows, fwd)])
    masked = [r for r in rows if r["mask"] != "causal"]
    (s,) = _fit([[r["dense_pairs"] * work / gain] for r in masked], [r["sdpa_f"] for r in masked])
    (sb,) = _fit([[r["dense_pairs"] * work / gain * s] for r in masked], [r["sdpa_fb"] - r["sdpa_f"] for r in masked])
    return {"R_BLOCKS": 1 / a, "C_CALL": c, "BWD_BLOCKS": bwd_b, "C_CALL_BWD": c_bwd, "R_MASKED": 1 / s, "BWD_SDPA": sb}


def check(rows: list[dict]) -> list[dict]:
    """Auto's pick in each case (with the library's constants) against the measured times."""
    out = []
    for r in rows:
        for mode in ("f", "fb"):
            pick = r[f"auto_{mode}"]
            best = min(r[f"blocks_{mode}"], r[f"sdpa_{mode}"])
            out.append(dict(S=r["S"], mask=r["mask"], mode="forward" if mode == "f" else "forward+backward",
                            auto=pick, vs_best=r[f"{pick}_{mode}"] / best,
                            vs_sdpa_dense=r[f"{pick}_{mode}"] / r[f"sdpa_dense_{mode}"]))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="S in {256, 512}, 3 repeats")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per contender (median)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--output", default=str(ROOT / "paper" / "results" / "auto-calibration.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seq_lens, repeats = ([256, 512], 3) if args.quick else ([256, 512, 1024, 2048], args.repeats)
    rows = measure(seq_lens, repeats)
    fitted, checks = fit(rows), check(rows)
    print("\nfitted constants (learnmask.ops.cost_model._R_BLOCKS, ...):")
    for name, value in fitted.items():
        print(f"  {name:12s} {value:.4g}")
    print(f"\n{'S':>5} {'mask':10} {'mode':17} {'auto':7} {'vs best':>8} {'vs dense SDPA':>14}")
    for c in checks:
        print(f"{c['S']:5d} {c['mask']:10} {c['mode']:17} {c['auto']:7} {c['vs_best']:8.2f} {c['vs_sdpa_dense']:14.2f}")
    worst = max(checks, key=lambda c: c["vs_best"])
    print(f"\nworst pick: {worst['vs_best']:.2f}x the faster backend ({worst['S']}, {worst['mask']}, {worst['mode']})")
    result = {"config": {"B": B, "H": H, "D": D, "threads": torch.get_num_threads(), "repeats": repeats,
                         "torch": torch.__version__}, "fitted": fitted, "checks": checks, "rows": rows}
    atomic_write_text(pathlib.Path(args.output), json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

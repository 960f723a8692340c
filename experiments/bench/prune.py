"""Benchmark: does removing heads and FFN units really make inference faster?

all-MiniLM-L6-v2 (BertModel, 6 layers, 12 heads, 1,536 FFN units) dense vs finalized with a
fraction of the heads and of the FFN units of EVERY layer removed (default 50% / 50%: 6 heads
and 768 units per layer), on CPU in fp32, ``torch.inference_mode`` and eval mode, on a batch of
random token ids (32 x 128 by default; all positions attended). Which units go is chosen by
weight magnitude (``--select magnitude``, default) or at random (``--select random``): the
shapes, hence the speed, are the same either way.

``--model encoder`` runs the same comparison on a ``torch.nn.TransformerEncoder`` of MiniLM's
shape (6 layers, width 384, 12 heads, 1,536 GELU units, post-norm, random weights, random input
vectors): the dense model runs torch's fused inference fast path, the finalized one its
``PrunedMultiheadAttention`` blocks (``learnmask.export.mha``, whose query identity map the FLOPs
count). Results: paper/results/bench-prune-encoder.json.

Printed: median wall time of ``--runs`` timed forward passes after ``--warmup`` untimed ones
(dense and pruned interleaved, so drifting machine load hits both alike), analytic FLOPs of the
transformer layers (``learnmask.stats.total_flops``; embeddings and pooler left out), the
measured speedup next to the FLOP reduction ratio, PASS/MISS for the goal
"speedup >= 0.8 x FLOP reduction ratio", and max |finalize - gated| of the outputs.
Results go to paper/results/bench-prune.json (``--quick``: bench-prune-quick.json), atomically.

    python experiments/bench/prune.py            # the full benchmark (quiet machine please)
    python experiments/bench/prune.py --quick    # batch 8 x 64, 5 runs: a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import torch

from learnmask.export import finalize
from learnmask.inject import apply_masks
from learnmask.inject.importance import set_baseline
from learnmask.io import atomic_write_text
from learnmask.stats import count_parameters, total_flops

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOAL = 0.8  # speedup must reach this fraction of the FLOP reduction ratio


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["minilm", "encoder"], default="minilm",
                        help="the packaged MiniLM (BertModel) or a MiniLM-shaped nn.TransformerEncoder")
    parser.add_argument("--model-path", default=None, help="local BERT-family folder (default: packaged MiniLM)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--runs", type=int, default=20, help="timed forward passes per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed passes per model first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (0: leave torch's default)")
    parser.add_argument("--heads-sparsity", type=float, default=0.5, help="fraction of heads removed per layer")
    parser.add_argument("--ffn-sparsity", type=float, default=0.5, help="fraction of FFN units removed per layer")
    parser.add_argument("--select", choices=["magnitude", "random"], default="magnitude")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="batch 8 x 64, 5 runs, 1 warm-up")
    parser.add_argument("--output", default=None, help="JSON file (default: paper/results/bench-prune[-quick].json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.seq_len, args.runs, args.warmup = 8, 64, 5, 1
    for name in ("heads_sparsity", "ffn_sparsity"):
        if not 0.0 <= getattr(args, name) < 1.0:
            parser.error(f"--{name.replace('_', '-')} must be in [0, 1)")
    return args


def load_model(path: str | None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    from learnmask.recipe.model import default_model_path

    transformers.logging.set_verbosity_error()
    folder = pathlib.Path(path) if path else default_model_path()
    return transformers.AutoModel.from_pretrained(folder, attn_implementation="sdpa").eval(), str(folder)


def make_encoder(seed: int) -> torch.nn.Module:
    """A MiniLM-shaped ``nn.TransformerEncoder`` (random weights, eval mode)."""
    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(384, 12, 1536, dropout=0.0, activation="gelu", batch_first=True)
    return torch.nn.TransformerEncoder(layer, 6, enable_nested_tensor=False).eval()


def load(args: argparse.Namespace):
    """(dense model, identical model to gate, batch of keyword inputs, description)."""
    if args.model == "encoder":
        src = torch.randn(args.batch_size, args.seq_len, 384, generator=torch.Generator().manual_seed(args.seed))
        return make_encoder(args.seed), make_encoder(args.seed), {"src": src}, "nn.TransformerEncoder (MiniLM shape)"
    dense, folder = load_model(args.model_path)
    gated, _ = load_model(args.model_path)
    ids = torch.randint(1000, dense.config.vocab_size, (args.batch_size, args.seq_len),
                        generator=torch.Generator().manual_seed(args.seed))
    return dense, gated, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, folder


def output(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    out = model(**batch)
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


def measure(models: dict, batch: dict, runs: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """Wall-clock and process-CPU seconds per forward pass of each model, interleaved run by run.

    CPU time (all threads of this process) is far less disturbed by other processes sharing the
    cores than wall time; with one thread it is the work done. Wall time is the goal's measure.
    """
    times = {name: {"wall": [], "cpu": []} for name in models}
    with torch.inference_mode():
        for _ in range(warmup):
            for model in models.values():
                model(**batch)
        for _ in range(runs):
            for name, model in models.items():
                cpu, wall = time.process_time(), time.perf_counter()
                model(**batch)
                times[name]["wall"].append(time.perf_counter() - wall)
                times[name]["cpu"].append(time.process_time() - cpu)
    return times


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dense, gated, batch, folder = load(args)
    handle = apply_masks(gated, heads=True, ffn=True, gate="fixed")
    keep = {"heads": 1.0 - args.heads_sparsity, "ffn": 1.0 - args.ffn_sparsity}
    masks = set_baseline(handle, args.select, keep, generator=torch.Generator().manual_seed(args.seed))
    with torch.inference_mode():
        gated_out = output(gated, batch)
    pruned = finalize(handle)
    with torch.inference_mode():
        diff = (output(pruned, batch) - gated_out).abs().max().item()
    times = measure({"dense": dense, "pruned": pruned}, batch, args.runs, args.warmup)
    t_dense, t_pruned = (statistics.median(times[m]["wall"]) for m in ("dense", "pruned"))
    c_dense, c_pruned = (statistics.median(times[m]["cpu"]) for m in ("dense", "pruned"))
    f_dense = total_flops(dense, seq_len=args.seq_len, batch_size=args.batch_size)
    f_pruned = total_flops(pruned, seq_len=args.seq_len, batch_size=args.batch_size)
    speedup, flop_ratio = t_dense / t_pruned, f_dense / f_pruned
    return {
        "model": folder, "batch_size": args.batch_size, "seq_len": args.seq_len, "runs": args.runs,
        "warmup": args.warmup, "threads": torch.get_num_threads(), "select": args.select, "seed": args.seed,
        "heads_kept": int(masks["heads"].sum()), "heads_total": masks["heads"].numel(),
        "ffn_units_kept": int(masks["ffn"].sum()), "ffn_units_total": masks["ffn"].numel(),
        "parameters_dense": count_parameters(dense), "parameters_pruned": count_parameters(pruned),
        "flops_dense": f_dense, "flops_pruned": f_pruned, "flop_reduction_ratio": flop_ratio,
        "seconds_dense_median": t_dense, "seconds_pruned_median": t_pruned,
        "cpu_seconds_dense_median": c_dense, "cpu_seconds_pruned_median": c_pruned,
        "seconds_dense": times["dense"]["wall"], "seconds_pruned": times["pruned"]["wall"],
        "cpu_seconds_dense": times["dense"]["cpu"], "cpu_seconds_pruned": times["pruned"]["cpu"],
        "speedup": speedup, "cpu_speedup": c_dense / c_pruned, "goal": f"speedup >= {GOAL} x flop_reduction_ratio",
        "load_average_1min": os.getloadavg()[0],
        "passed": speedup >= GOAL * flop_ratio, "finalize_vs_gated_max_abs_diff": diff,
        "quick": args.quick, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def report(r: dict) -> str:
    rows = [
        ("", "dense", "pruned"),
        ("heads kept", str(r["heads_total"]), str(r["heads_kept"])),
        ("FFN units kept", str(r["ffn_units_total"]), str(r["ffn_units_kept"])),
        ("parameters", f"{r['parameters_dense']:,}", f"{r['parameters_pruned']:,}"),
        ("GFLOPs (layers)", f"{r['flops_dense'] / 1e9:.2f}", f"{r['flops_pruned'] / 1e9:.2f}"),
        ("median ms/batch", f"{r['seconds_dense_median'] * 1e3:.1f}", f"{r['seconds_pruned_median'] * 1e3:.1f}"),
        ("median CPU ms/batch", f"{r['cpu_seconds_dense_median'] * 1e3:.1f}",
         f"{r['cpu_seconds_pruned_median'] * 1e3:.1f}"),
    ]
    lines = [f"{r['model']} prune benchmark: batch {r['batch_size']} x {r['seq_len']} tokens, CPU fp32, "
             f"{r['threads']} threads, median of {r['runs']} runs after {r['warmup']} warm-up, units by {r['select']}"]
    lines += [f"{a:<18}{b:>14}{c:>14}" for a, b, c in rows]
    verdict = "PASS" if r["passed"] else "MISS"
    lines.append(f"FLOP reduction ratio {r['flop_reduction_ratio']:.2f}x, measured speedup {r['speedup']:.2f}x "
                 f"({r['speedup'] / r['flop_reduction_ratio']:.2f} of it; goal >= {GOAL}): {verdict}")
    lines.append(f"(process CPU time speedup {r['cpu_speedup']:.2f}x; 1-min load average {r['load_average_1min']:.1f} "
                 f"on {r['cpu_count']} cores: wall times are noisy when it exceeds the thread count)")
    lines.append(f"finalize vs gated max abs diff: {r['finalize_vs_gated_max_abs_diff']:.2e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(report(result))
    default = f"bench-prune{'-encoder' if args.model == 'encoder' else ''}{'-quick' if args.quick else ''}.json"
    output = pathlib.Path(args.output) if args.output else ROOT / "paper" / "results" / default
    atomic_write_text(output, json.dumps(result, indent=2) + "\n")
    print(f"results written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

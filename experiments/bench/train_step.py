"""Benchmark: what does training head gates through learnmask's masked-attention op cost?

One training step of all-MiniLM-L6-v2 with a classification head (forward, backward, AdamW) on
CPU in fp32, train mode (attention dropout 0.1 as in its config), three ways, on the same
batches and the same starting weights:

- ``dense``: the ungated model, on its own ``sdpa`` attention;
- ``hooks``: hard-concrete head gates (72) by hooks on the model's own ``sdpa`` attention
  (``apply_masks(..., attention="hooks")``), gate logits in the optimizer;
- ``op``: the same gates fused into :func:`learnmask.ops.masked_attention` (``attention="op"``,
  backend ``auto``): the model's padding mask arrives as a learnmask mask.

Batches: ``--batch-size`` sequences of random token ids padded to ``--seq-len`` (default 32 x 48
and 32 x 128), each sequence's real length drawn uniformly from [S/4, S] (seeded), so the padding
mask is not trivial. Steps of the three variants are interleaved (drifting machine load hits
all alike); printed: median milliseconds per step over ``--runs`` timed steps after
``--warmup`` untimed ones, the ratios op/dense and op/hooks, and PASS/MISS for the goals
op <= 1.10 x dense and op <= 1.0 x hooks (both ratios of medians). With ``--busy`` a second
2-thread torch job runs beside it the whole time (a matmul loop in another process).

Results go atomically to paper/results/bench-train-step.json (``--quick``: -quick.json).

    python experiments/bench/train_step.py            # quiet machine please
    python experiments/bench/train_step.py --quick    # 8 x 48 only, 3 runs: a smoke run
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import platform
import statistics
import time

import torch

from learnmask.gates import param_groups
from learnmask.inject import apply_masks
from learnmask.io import atomic_write_text

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOALS = {"op_vs_dense": 1.10, "op_vs_hooks": 1.0}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[48, 128])
    parser.add_argument("--runs", type=int, default=15, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--busy", action="store_true", help="a second 2-thread torch job runs beside it")
    parser.add_argument("--quick", action="store_true", help="8 x 48, 3 runs, 1 warm-up")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.seq_lens, args.runs, args.warmup = 8, [48], 3, 1
    return args


def load_model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    from learnmask.recipe.model import default_model_path

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        str(default_model_path()), num_labels=6, attn_implementation="sdpa")


def make_batches(n: int, batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(max(1, seq_len // 4), seq_len + 1, (batch_size,), generator=g)
        ids = torch.randint(1000, vocab, (batch_size, seq_len), generator=g)
        mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask,
                    "labels": torch.randint(0, 6, (batch_size,), generator=g)})
    return out


def variant(base, kind: str):
    model = copy.deepcopy(base).train()
    if kind != "dense":
        apply_masks(model, heads=True, attention=kind, gate_options={"init_log_alpha": 3.0})
    optimizer = torch.optim.AdamW(param_groups(model, lr=2e-4, weight_decay=0.01, gate_lr=0.1))
    return model, optimizer


def step(model, optimizer, batch) -> float:
    start = time.perf_counter()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measure(base, batches: list[dict], runs: int, warmup: int) -> dict[str, list[float]]:
    kinds = ("dense", "hooks", "op")
    models = {kind: variant(base, kind) for kind in kinds}
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for index in range(warmup + runs):
        batch = batches[index % len(batches)]
        for kind in kinds:
            seconds = step(*models[kind], batch)
            if index >= warmup:
                times[kind].append(seconds)
    return times


def busy_job(threads: int):
    """A second torch job: 2-thread matmuls in a loop, in another process (killed at the end)."""
    import subprocess
    import sys

    code = (f"import torch; torch.set_num_threads({threads}); a = torch.randn(512, 512)\n"
            "while True: a = (a @ a).tanh()")
    return subprocess.Popen([sys.executable, "-c", code])


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_model()
    vocab = base.config.vocab_size
    job = busy_job(2) if args.busy else None
    results = {}
    try:
        for seq_len in args.seq_lens:
            batches = make_batches(4, args.batch_size, seq_len, vocab, seed=seq_len)
            times = measure(base, batches, args.runs, args.warmup)
            med = {kind: 1e3 * statistics.median(values) for kind, values in times.items()}
            ratios = {"op_vs_dense": med["op"] / med["dense"], "op_vs_hooks": med["op"] / med["hooks"]}
            verdicts = {name: "PASS" if ratios[name] <= GOALS[name] else "MISS" for name in GOALS}
            results[f"{args.batch_size}x{seq_len}"] = {
                "median_ms": {k: round(v, 2) for k, v in med.items()},
                "all_ms": {k: [round(1e3 * t, 2) for t in v] for k, v in times.items()},
                "ratios": {k: round(v, 3) for k, v in ratios.items()}, "goals": verdicts}
            print(f"{args.batch_size} x {seq_len}: dense {med['dense']:.1f} ms, hooks {med['hooks']:.1f} ms, "
                  f"op {med['op']:.1f} ms; op/dense {ratios['op_vs_dense']:.3f} (goal <= {GOALS['op_vs_dense']}: "
                  f"{verdicts['op_vs_dense']}), op/hooks {ratios['op_vs_hooks']:.3f} (goal <= "
                  f"{GOALS['op_vs_hooks']}: {verdicts['op_vs_hooks']})")
    finally:
        if job is not None:
            job.kill()
    report = {"benchmark": "train_step", "threads": args.threads, "busy_second_job": args.busy,
              "runs": args.runs, "warmup": args.warmup, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "results": results}
    name = "bench-train-step" + ("-busy" if args.busy else "") + ("-quick" if args.quick else "") + ".json"
    output = pathlib.Path(args.output) if args.output else ROOT / "paper" / "results" / name
    atomic_write_text(output, json.dumps(report, indent=1) + "\n")
    print(f"wrote {output}")
    return report


if __name__ == "__main__":
    main()

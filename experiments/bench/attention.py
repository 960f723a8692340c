"""Benchmark: masked attention on CPU — learnmask's best backend vs dense-mask SDPA and compiled FlexAttention.

CPU, fp32, B=2, H=8, D=64, S in {512, 2048}; masks: causal, causal sliding window of 128 keys
(including the query), 8 packed documents (bidirectional inside a document, random boundaries per
batch row), and 50% padding (real lengths 3/8 and 5/8 of S). Forward and forward+backward.

Contenders, all in this one run:

- ``sdpa_dense``: ``scaled_dot_product_attention`` with the same dense boolean mask (built once, untimed);
- ``flex``: ``torch.compile(flex_attention)`` with a ``BlockMask`` from ``create_block_mask`` (built
  once, untimed; build and compile times reported apart). FlexAttention has no backward on CPU,
  so forward+backward rows show it as n/a;
- learnmask ``masked_attention`` with each CPU backend (``blocks``, ``sdpa``, ``flex``; the flex
  backend is forward only on CPU); "best" is the fastest of them per row, chosen after the fact;
- ``learnmask_auto``: ``backend="auto"`` (what a user gets), with the backend it picked
  (:func:`learnmask.ops.attention.choose_backend`, in the row's grad mode).

Dynamic masks: a new hard token gate z in {0, 1} per key every step (10% of keys dropped). learnmask
passes z as ``token_gate`` (a ``score_mod`` on the cached BlockMask: nothing is rebuilt); a
FlexAttention user who encodes z in ``mask_mod`` must rebuild the BlockMask every step (timed with
eager and with compiled ``create_block_mask``; the faster counts). Both give the same output (checked).

Goals (PASS/MISS): best <= 1.05 x dense-mask SDPA time everywhere; >= 2x faster than it for the
window and documents at the largest S; >= 0.8x the speed of compiled FlexAttention on static masks
(forward); faster than FlexAttention end to end with dynamic masks; no allocation as large as a
(B, H, S, S) bool tensor on learnmask's block paths (largest single allocation and peak memory are
measured with the torch profiler's CPU allocator events). Each goal is checked twice: on "best" and on
"auto".

Times are medians of ``--repeats`` wall-clock runs after a warm-up call (which includes compilation).

Shared cores (``--busy``, issue 11): a second job, another process running 2-thread torch matmuls
in a loop, runs beside the whole measurement; the dynamic-mask rows are skipped and the one goal is
``auto`` >= 2x faster than dense-mask SDPA for the window and documents at the largest S, forward
and forward+backward (checked on "best" too). Results go to ``bench-attention-busy.json``. Peak
memory comes from the profiler, which records the calling thread only, so ``blocks`` runs inline
while it measures (see :mod:`learnmask.ops.cpu_pool`); timed runs use its two lanes.

    python experiments/bench/attention.py          # the issue's grid (minutes; a quiet machine please)
    python experiments/bench/attention.py --quick  # S=384, 2 repeats: a smoke run
    python experiments/bench/attention.py --busy --seq-lens 2048 --masks window,documents
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from torch.profiler import ProfilerActivity, profile

from learnmask.io import atomic_write_text
from learnmask.masks import attention as am
from learnmask.ops.attention import choose_backend, masked_attention

ROOT = pathlib.Path(__file__).resolve().parents[2]
B, H, D = 2, 8, 64
MASKS = ["causal", "window", "documents", "padding"]
BACKENDS = ["blocks", "sdpa", "flex"]
warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", default="512,2048", help="comma-separated sequence lengths")
    parser.add_argument("--masks", default=",".join(MASKS), help=f"comma-separated, from {MASKS}")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per contender (median)")
    parser.add_argument("--steps", type=int, default=5, help="steps of the dynamic-mask comparison")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="S=384, 2 repeats, 3 dynamic steps")
    parser.add_argument("--busy", action="store_true",
                        help="a second 2-thread torch job runs beside the measurement (static masks only)")
    parser.add_argument("--output", default=None,
                        help="JSON file (default: paper/results/bench-attention[-busy][-quick].json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seq_lens, args.repeats, args.steps = "384", 2, 3
    args.seq_lens = [int(s) for s in args.seq_lens.split(",")]
    args.masks = args.masks.split(",")
    unknown = set(args.masks) - set(MASKS)
    if unknown:
        parser.error(f"unknown masks {sorted(unknown)}; choose from {MASKS}")
    if args.output is None:
        suffix = ("-busy" if args.busy else "") + ("-quick" if args.quick else "")
        args.output = ROOT / "paper" / "results" / f"bench-attention{suffix}.json"
    return args


def build_mask(kind: str, seq: int, gen: torch.Generator):
    """(learnmask mask, FlexAttention mask_mod, dense keep broadcastable to (B, H, S, S))."""
    if kind == "causal":
        mask = am.causal()
    elif kind == "window":
        mask = am.sliding_window(128)
    elif kind == "documents":
        cuts = torch.stack([torch.randperm(seq - 1, generator=gen)[:7].sort().values + 1 for _ in range(B)])
        ids = torch.zeros(B, seq, dtype=torch.long)
        ids.scatter_add_(1, cuts, torch.ones_like(cuts))
        mask = am.document(ids.cumsum(-1))
    else:
        lengths = torch.tensor([seq * 3 // 8, seq * 5 // 8])
        mask = am.padding(torch.arange(seq)[None, :] < lengths[:, None])
    mod = mask.mask_mod  # a plain FlexAttention mask_mod over the same tensors
    return mask, mod, mask.keep(B, 1, seq, seq).expand(B, 1, seq, seq).contiguous()


def timed(fn, repeats: int) -> dict:
    """Median wall seconds of ``repeats`` calls after one warm-up call (its time reported apart), and
    the median process CPU seconds (all threads; less disturbed by other processes, but it counts
    threads spinning at barriers)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    median = statistics.median(times)
    return {"s": median, "cpu_s": statistics.median(cpu), "first_call_s": first,
            "compile_s": max(0.0, first - median)}


def busy_job(threads: int = 2) -> subprocess.Popen:
    """A second torch job: ``threads``-thread 512x512 matmuls in a loop, in another process (the
    caller kills it)."""
    code = (f"import torch; torch.set_num_threads({threads}); a = torch.randn(512, 512)\n"
            "while True: a = (a @ a).tanh()")
    return subprocess.Popen([sys.executable, "-c", code])


def memory(fn) -> dict:
    """Peak bytes allocated during one call (above the start) and the largest single allocation."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = largest = 0
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    for _, nbytes in events:
        live += nbytes
        peak, largest = max(peak, live), max(largest, nbytes)
    return {"peak_bytes": peak, "largest_alloc_bytes": largest}


def step_fn(fn, backward: bool, params):
    def run():
        if backward:
            out = fn()
            torch.autograd.grad(out.sum(), params)
        else:
            with torch.no_grad():
                fn()
    return run


def static_rows(kind: str, seq: int, args, gen) -> list[dict]:
    mask, mod, keep = build_mask(kind, seq, gen)
    q, k, v = (torch.randn(B, H, seq, D, generator=gen, requires_grad=True) for _ in range(3))
    start = time.perf_counter()
    block_mask = create_block_mask(mod, B if mask.per_batch else 1, 1, seq, seq, device="cpu")
    build_s = time.perf_counter() - start
    compiled = torch.compile(flex_attention, dynamic=False)
    contenders = {
        "sdpa_dense": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=keep),
        "flex": lambda: compiled(q.detach(), k.detach(), v.detach(), block_mask=block_mask),
    }
    for name in BACKENDS:
        contenders[f"learnmask_{name}"] = lambda name=name: masked_attention(q, k, v, mask=mask, backend=name)
    contenders["learnmask_auto"] = lambda: masked_attention(q, k, v, mask=mask)
    reference = masked_attention(q.detach(), k.detach(), v.detach(), mask=mask, backend="sdpa")
    rows = []
    for mode in ("forward", "forward+backward"):
        row = {"S": seq, "mask": kind, "mode": mode, "flex_block_mask_build_s": build_s, "contenders": {}}
        with torch.set_grad_enabled(mode != "forward"):
            choice = choose_backend(q, k, v, mask=mask)
        row["auto_picked"], row["auto_reason"] = choice.name, choice.reason
        for name, fn in contenders.items():
            if mode != "forward" and name in ("flex", "learnmask_flex"):
                row["contenders"][name] = {"s": None, "note": "FlexAttention has no backward on CPU"}
                continue
            run = step_fn(fn, mode != "forward", (q, k, v))
            entry = timed(run, args.repeats) | memory(run)
            if mode == "forward":
                with torch.no_grad():
                    entry["max_abs_err_vs_sdpa"] = (fn() - reference).abs().max().item()
            row["contenders"][name] = entry
        rows.append(finish_row(row, seq))
    return rows


def finish_row(row: dict, seq: int) -> dict:
    """Add "best" (the fastest named learnmask backend) and, for both it and "auto", the speedups."""
    ours = {n: c for n, c in row["contenders"].items()
            if n.startswith("learnmask_") and n != "learnmask_auto" and c["s"] is not None}
    best = min(ours, key=lambda n: ours[n]["s"])
    row["best"] = best
    t_dense, flex = row["contenders"]["sdpa_dense"]["s"], row["contenders"]["flex"]["s"]
    bhss = B * H * seq * seq  # bytes of a (B, H, S, S) bool tensor
    for label, entry in (("", ours[best]), ("auto_", row["contenders"]["learnmask_auto"])):
        row[f"{label}speedup_vs_sdpa_dense"] = t_dense / entry["s"]
        row[f"{label}speed_vs_flex"] = None if flex is None else flex / entry["s"]
        row[f"{label}largest_alloc_vs_bhss_bool"] = entry["largest_alloc_bytes"] / bhss
    return row


def dynamic_rows(kind: str, seq: int, args, gen) -> list[dict]:
    mask, base_mod, _ = build_mask(kind, seq, gen)
    q, k, v = (torch.randn(B, H, seq, D, generator=gen, requires_grad=True) for _ in range(3))
    gates = [(torch.rand(B, seq, generator=gen) > 0.1).float().requires_grad_() for _ in range(args.steps + 1)]
    compiled = torch.compile(flex_attention, dynamic=False)
    state = {"i": 0}

    def next_gate():
        state["i"] = (state["i"] + 1) % len(gates)
        return gates[state["i"]]

    def flex_user(compile_cbm: bool):
        def run():
            z = next_gate().detach().bool()

            def mod(b, h, q_idx, kv_idx):
                return base_mod(b, h, q_idx, kv_idx) & z[b, kv_idx]

            bm = create_block_mask(mod, B, 1, seq, seq, device="cpu", _compile=compile_cbm)
            return compiled(q.detach(), k.detach(), v.detach(), block_mask=bm)
        return run

    def ours(backend):
        return lambda: masked_attention(q, k, v, mask=mask, token_gate=next_gate(), backend=backend)

    rows = []
    for mode in ("forward", "forward+backward"):
        row = {"S": seq, "mask": kind, "mode": mode, "contenders": {}}
        fns = {"flex_rebuild_eager_cbm": flex_user(False), "flex_rebuild_compiled_cbm": flex_user(True),
               "learnmask_flex": ours("flex"), "learnmask_blocks": ours("blocks"), "learnmask_auto": ours("auto")}
        with torch.set_grad_enabled(mode != "forward"):
            row["auto_picked"] = choose_backend(q, k, v, mask=mask, token_gate=gates[0]).name
        for name, fn in fns.items():
            if mode != "forward" and "flex" in name:
                row["contenders"][name] = {"s": None, "note": "FlexAttention has no backward on CPU"}
                continue
            row["contenders"][name] = timed(step_fn(fn, mode != "forward", (q, k, v)), args.steps)
        if mode == "forward":
            state["i"] = 0
            with torch.no_grad():
                theirs = fns["flex_rebuild_eager_cbm"]()
                state["i"] = 0
                mine = fns["learnmask_flex"]()
            row["max_abs_err_flex_rebuild_vs_learnmask"] = (theirs - mine).abs().max().item()
        ours_t = {n: c["s"] for n, c in row["contenders"].items()
                  if n.startswith("learnmask_") and n != "learnmask_auto" and c["s"] is not None}
        row["best"] = min(ours_t, key=ours_t.get)
        theirs_t = [c["s"] for n, c in row["contenders"].items() if n.startswith("flex_") and c["s"] is not None]
        row["speedup_vs_flex_rebuild"] = min(theirs_t) / ours_t[row["best"]] if theirs_t else None
        t_auto = row["contenders"]["learnmask_auto"]["s"]
        row["auto_speedup_vs_flex_rebuild"] = min(theirs_t) / t_auto if theirs_t else None
        rows.append(row)
    return rows


def goals(static: list[dict], dynamic: list[dict], seq_max: int, busy: bool = False) -> list[dict]:
    """PASS/MISS of the quiet goals, or with ``busy`` of the shared-cores goal (module docstring)."""
    out = []

    def add(name, row, value, ok):
        out.append({"goal": name, "S": row["S"], "mask": row["mask"], "mode": row["mode"],
                    "value": value, "status": "PASS" if ok else "MISS"})

    for who, p in (("best", ""), ("auto", "auto_")):
        for row in static:
            big_sparse = row["S"] == seq_max and row["mask"] in ("window", "documents")
            if busy:
                if big_sparse:
                    add(f"[{who}] speedup vs sdpa_dense >= 2 with a second job busy (largest S)", row,
                        row[f"{p}speedup_vs_sdpa_dense"], row[f"{p}speedup_vs_sdpa_dense"] >= 2.0)
                continue
            ratio = 1.0 / row[f"{p}speedup_vs_sdpa_dense"]
            add(f"[{who}] time / time(sdpa_dense) <= 1.05", row, ratio, ratio <= 1.05)
            if big_sparse:
                add(f"[{who}] speedup vs sdpa_dense >= 2 (largest S)", row, row[f"{p}speedup_vs_sdpa_dense"],
                    row[f"{p}speedup_vs_sdpa_dense"] >= 2.0)
            if row[f"{p}speed_vs_flex"] is not None:
                add(f"[{who}] speed vs compiled flex >= 0.8 (static)", row, row[f"{p}speed_vs_flex"],
                    row[f"{p}speed_vs_flex"] >= 0.8)
            add(f"[{who}] largest allocation < (B, H, S, S) bool", row, row[f"{p}largest_alloc_vs_bhss_bool"],
                row[f"{p}largest_alloc_vs_bhss_bool"] < 1.0)
        for row in dynamic:
            if row[f"{p}speedup_vs_flex_rebuild"] is not None:
                add(f"[{who}] faster than flex with a rebuilt BlockMask (dynamic)", row,
                    row[f"{p}speedup_vs_flex_rebuild"], row[f"{p}speedup_vs_flex_rebuild"] > 1.0)
    return out


def fmt_ms(entry: dict) -> str:
    return "n/a" if entry.get("s") is None else f"{1e3 * entry['s']:.1f}"


def print_tables(static: list[dict], dynamic: list[dict], goal_rows: list[dict]) -> None:
    names = ["sdpa_dense", "flex"] + [f"learnmask_{b}" for b in BACKENDS] + ["learnmask_auto"]
    print("\nstatic masks (ms per call; best = fastest named learnmask backend, after the fact; auto = "
          "backend='auto', picked = what it ran)")
    print(f"{'S':>5} {'mask':<10} {'mode':<17}" + "".join(f"{n:>17}" for n in names)
          + f"{'best':>17}{'x dense':>9}{'x flex':>8}{'picked':>8}{'auto x dense':>13}{'auto x flex':>12}"
          + f"{'peak MB':>9}")
    for r in static:
        best = r["contenders"][r["best"]]
        flex = "n/a" if r["speed_vs_flex"] is None else f"{r['speed_vs_flex']:.2f}"
        aflex = "n/a" if r["auto_speed_vs_flex"] is None else f"{r['auto_speed_vs_flex']:.2f}"
        times = "".join(f"{fmt_ms(r['contenders'][n]):>17}" for n in names)
        print(f"{r['S']:>5} {r['mask']:<10} {r['mode']:<17}" + times
              + f"{r['best']:>17}{r['speedup_vs_sdpa_dense']:>9.2f}{flex:>8}{r['auto_picked']:>8}"
              + f"{r['auto_speedup_vs_sdpa_dense']:>13.2f}{aflex:>12}{best['peak_bytes'] / 2**20:>9.1f}")
    print("\ndynamic token gates, a new z every step (ms per step, rebuild included)")
    dyn = ["flex_rebuild_eager_cbm", "flex_rebuild_compiled_cbm", "learnmask_flex", "learnmask_blocks",
           "learnmask_auto"]
    print(f"{'S':>5} {'mask':<10} {'mode':<17}" + "".join(f"{n:>27}" for n in dyn)
          + f"{'x flex':>8}{'picked':>8}{'auto x flex':>12}")
    for r in dynamic:
        x = "n/a" if r["speedup_vs_flex_rebuild"] is None else f"{r['speedup_vs_flex_rebuild']:.2f}"
        ax = "n/a" if r["auto_speedup_vs_flex_rebuild"] is None else f"{r['auto_speedup_vs_flex_rebuild']:.2f}"
        print(f"{r['S']:>5} {r['mask']:<10} {r['mode']:<17}" + "".join(f"{fmt_ms(r['contenders'][n]):>27}" for n in dyn)
              + f"{x:>8}{r['auto_picked']:>8}{ax:>12}")
    print("\ngoals")
    for g in goal_rows:
        print(f"  {g['status']:<5} {g['goal']:<60} S={g['S']:<5} {g['mask']:<10} {g['mode']:<17} {g['value']:.3f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    # Every mask kind, gate and shape is one compiled variant of flex_attention; dynamo's default of 8
    # would silently send the rest to eager (dense) FlexAttention.
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    static, dynamic = [], []
    second = busy_job() if args.busy else None
    try:
        if second is not None:
            time.sleep(1.0)  # let it start
        for seq in args.seq_lens:
            for kind in args.masks:
                print(f"S={seq} {kind} ...", flush=True)
                static += static_rows(kind, seq, args, gen)
                if second is None:
                    dynamic += dynamic_rows(kind, seq, args, gen)
    finally:
        if second is not None:
            second.kill()
            second.wait()
    goal_rows = goals(static, dynamic, max(args.seq_lens), busy=args.busy)
    if args.busy:
        print("\nwith a second job busy on the same cores (2-thread torch matmuls in another process)")
    print_tables(static, dynamic, goal_rows)
    results = {
        "config": {"B": B, "H": H, "D": D, "dtype": "float32", "seq_lens": args.seq_lens, "masks": args.masks,
                   "repeats": args.repeats, "steps": args.steps, "quick": args.quick,
                   "busy": "a second process: 2-thread 512x512 torch matmuls in a loop" if args.busy else None,
                   "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "static": static, "dynamic": dynamic, "goals": goal_rows,
    }
    atomic_write_text(args.output, json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

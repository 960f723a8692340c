"""GPU benchmark of the fused ``triton`` masked-attention backend against FlexAttention and SDPA.

Goal: with soft token gates fused (``log z`` added to the scores, gradient reaching z), the triton
kernel runs at >= 0.9x the speed of compiled FlexAttention (``torch.compile(flex_attention)`` with a
``BlockMask``, the gate read by ``score_mod``) in the forward pass and in forward+backward. SDPA with
a dense additive mask (``-inf`` off the mask, ``log z`` on it) is timed as the dense baseline.

Cases: fp16 and bf16 (S = 8192: fp16 only, ``--long-dtypes``); D = 64; (S, B, H) in (1024, 8, 16),
(4096, 4, 16), (8192, 2, 16); masks causal,
causal sliding window of 256 keys, 8 packed documents (causal inside each), ~50% key padding (not
causal). Every case is first checked against float32 math on the GPU (max abs errors of the output
and of the q, k, v, z gradients are printed and stored), then timed with
``triton.testing.do_bench`` (median ms). A case that fails records its error and the run goes on;
cases left when ``--budget-s`` runs out are recorded as skipped. Results are rewritten atomically
after every case to ``--out``. Each case records the tile configuration the triton launcher chose
per kernel and the timings it chose from.

First, the host-overhead floor: a gated causal call at S = 128 (B = 1, H = 16, fp16), where the GPU
work is negligible, timed with ``do_bench`` (fwd, fwd+bwd) and as host time per call (the mean
wall time of many calls issued without synchronising), for triton and flex.

Run (CUDA only; exits with a message otherwise):
    python experiments/bench/attention_gpu.py [--out paper/results/bench-attention-gpu.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from learnmask.io import atomic_write_text
from learnmask.masks.structure import MaskStructure

SHAPES = {1024: (8, 16), 4096: (4, 16), 8192: (2, 16)}  # S -> (B, H)
HEAD_DIM = 64
GOAL = 0.9  # triton speed / FlexAttention speed, with soft token gates fused
WINDOW = 256
DOCUMENTS = 8


def log(*parts) -> None:
    print(*parts, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="paper/results/bench-attention-gpu.json")
    parser.add_argument("--seq-lens", default="4096,1024,8192", help="comma-separated, run in this order")
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--masks", default="causal,window,documents,padding")
    parser.add_argument("--long-dtypes", default="float16", help="dtypes run at S >= 8192")
    parser.add_argument("--budget-s", type=float, default=200.0, help="start no new case after this many seconds")
    parser.add_argument("--rep-ms", type=int, default=60, help="do_bench measuring time per measurement")
    return parser.parse_args(argv)


def build_mask(kind: str, batch: int, seq: int, device: str, gen: torch.Generator):
    """(MaskStructure, FlexAttention mask_mod, dense keep (B, 1, S, S) bool, mask depends on batch)."""
    if kind == "causal":
        return (MaskStructure(causal=True), lambda b, h, q, kv: q >= kv,
                MaskStructure(causal=True).keep(seq, seq, device=device), False)
    if kind == "window":
        structure = MaskStructure(causal=True, window=WINDOW)
        return (structure, lambda b, h, q, kv: (q >= kv) & (q - kv < WINDOW),
                structure.keep(seq, seq, device=device), False)
    if kind == "documents":
        cuts = torch.sort(torch.randperm(seq - 1, generator=gen)[: DOCUMENTS - 1] + 1).values
        starts = torch.zeros(seq, dtype=torch.long)
        starts[cuts] = 1
        docs = torch.cumsum(starts, 0)[None].repeat(batch, 1).to(device)
        structure = MaskStructure(causal=True, q_document_ids=docs, kv_document_ids=docs)
        return (structure, lambda b, h, q, kv: (q >= kv) & (docs[b, q] == docs[b, kv]),
                structure.keep(seq, seq, batch=batch, device=device), True)
    if kind == "padding":
        lengths = (seq * (0.4 + 0.2 * torch.rand(batch, generator=gen))).long().to(device)
        real = torch.arange(seq, device=device)[None] < lengths[:, None]
        structure = MaskStructure(key_padding=real)
        return (structure, lambda b, h, q, kv: kv < lengths[b],
                structure.keep(seq, seq, batch=batch, device=device), True)
    raise ValueError(f"unknown mask {kind!r}; expected causal, window, documents or padding")


def make_impls(structure, mask_mod, keep, batch_dependent, batch, heads, seq):
    """name -> fn(q, k, v, z) -> out, each with the token gate z (B, S) fused its own way."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from learnmask.ops.triton_backend import triton_attention

    block_mask = create_block_mask(mask_mod, batch if batch_dependent else None, None, seq, seq, device="cuda")

    @torch.compile(dynamic=False)
    def flex(q, k, v, z):
        log_z = torch.log(z)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + log_z[b, kv_idx]

        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)

    @torch.compile(dynamic=False)
    def flex_z_detached(q, k, v, z):
        log_z = torch.log(z.detach())

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + log_z[b, kv_idx]

        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)

    def sdpa(q, k, v, z):
        bias = torch.where(keep, torch.log(z)[:, None, None, :].to(q.dtype), float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    def triton_fused(q, k, v, z):
        return triton_attention(q, k, v, structure, token_gate=z)

    return {"triton": triton_fused, "flex": flex, "sdpa": sdpa}, flex_z_detached


def reference(q, k, v, z, keep):
    """Float32 math: out and grads of (q, k, v, z) for a fixed output gradient."""
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v, z)]
    bias = torch.where(keep, torch.log(leaves[3])[:, None, None, :], float("-inf"))
    out = F.scaled_dot_product_attention(*leaves[:3], attn_mask=bias)
    return out, leaves


def run_impl(fn, q, k, v, z, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, z)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad.to(out.dtype), allow_unused=True)
    return [out] + [torch.full_like(t, float("nan")) if g is None else g for t, g in zip(leaves, grads)]


def check(impls, q, k, v, z, grad, keep) -> dict:
    """Max abs error of each implementation's out, dq, dk, dv, dz against float32 math."""
    out, leaves = reference(q, k, v, z, keep)
    golden = [out] + list(torch.autograd.grad(out, leaves, grad.float()))
    errors = {"float32_max_abs": {part: t.abs().max().item()
                                  for part, t in zip(["out", "dq", "dk", "dv", "dz"], golden)}}
    for name, fn in impls.items():
        try:
            got = run_impl(fn, q, k, v, z, grad)
            errors[name] = {part: (a.float() - b).abs().max().item()
                            for part, a, b in zip(["out", "dq", "dk", "dv", "dz"], got, golden)}
        except Exception as error:  # noqa: BLE001 - a failing implementation is recorded, not fatal
            errors[name] = {"error": f"{type(error).__name__}: {error}"[:500]}
    torch.cuda.synchronize()
    return errors


def time_impl(fn, q, k, v, z, grad, rep_ms: int) -> dict:
    """Median ms of the forward (inputs requiring grad) and of forward + backward."""
    import triton

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, z)]

    def forward():
        return fn(*leaves)

    def forward_backward():
        out = fn(*leaves)
        torch.autograd.grad(out, leaves, grad, allow_unused=True)

    bench = dict(warmup=max(10, rep_ms // 4), rep=rep_ms, return_mode="median")
    return {"fwd": triton.testing.do_bench(forward, **bench),
            "fwd_bwd": triton.testing.do_bench(forward_backward, **bench)}


def run_case(dtype_name: str, mask: str, seq: int, args) -> dict:
    batch, heads = SHAPES.get(seq, (2, 16))
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(seq)
    structure, mask_mod, keep, batch_dependent = build_mask(mask, batch, seq, "cuda", gen)
    q, k, v, grad = (torch.randn(batch, heads, seq, HEAD_DIM, generator=gen).to("cuda", dtype) for _ in range(4))
    z = (0.1 + 0.9 * torch.rand(batch, seq, generator=gen)).to("cuda")
    record = {"dtype": dtype_name, "mask": mask, "S": seq, "B": batch, "H": heads, "D": HEAD_DIM, "gated": True}
    start = time.perf_counter()
    impls, flex_z_detached = make_impls(structure, mask_mod, keep, batch_dependent, batch, heads, seq)
    record["max_abs_err"] = check(impls, q, k, v, z, grad, keep)
    if "error" in record["max_abs_err"]["flex"]:  # e.g. no gradients for captured tensors in this torch
        record["flex_note"] = "flex with a differentiable gate failed; timed with the gate detached (no dz): " \
            + record["max_abs_err"]["flex"]["error"]
        impls["flex"] = flex_z_detached
        record["max_abs_err"]["flex"] = check({"flex": flex_z_detached}, q, k, v, z, grad, keep)["flex"]
    record["first_call_s"] = round(time.perf_counter() - start, 2)
    log("  max abs errors vs float32: " + "; ".join(
        f"{name} " + ", ".join(f"{part} {value:.2e}" if isinstance(value, float) else str(value)
                               for part, value in errs.items()) for name, errs in record["max_abs_err"].items()))
    record["ms"] = {}
    for name, fn in impls.items():
        if "error" in record["max_abs_err"][name]:
            continue
        try:
            record["ms"][name] = time_impl(fn, q, k, v, z, grad, args.rep_ms)
        except Exception as error:  # noqa: BLE001
            record["ms"][name] = {"error": f"{type(error).__name__}: {error}"[:500]}
    record.update(verdict(record))
    record["triton_configs"] = tuned_configs(structure, q, z)
    log(f"  triton configs (BLOCK_M, BLOCK_N, warps, stages): "
        f"{ {name: c['chosen'] for name, c in record['triton_configs'].items()} }")
    return record


def tuned_configs(structure, q, z) -> dict:
    """Per kernel, the tile configuration the launcher chose for this case and the timings (ms) it
    chose from (for tuning the config lists)."""
    from learnmask.ops import triton_launch

    plan = triton_launch.LaunchPlan.build(structure, q, q, q, 1.0 / math.sqrt(q.shape[-1]), None, z is not None)
    out = {}
    for name in ("fwd", "dq", "dkdv"):
        key = (name,) + plan.tune_key
        out[name] = {"chosen": triton_launch.CHOSEN.get(key), "timings_ms": triton_launch.TIMINGS.get(key)}
    return out


def host_overhead(rep_ms: int, calls: int = 200) -> dict:
    """Timings of a gated causal call at S = 128 (tiny GPU work): the per-call floor of each path."""
    batch, heads, seq = 1, 16, 128
    gen = torch.Generator().manual_seed(0)
    structure, mask_mod, keep, dependent = build_mask("causal", batch, seq, "cuda", gen)
    q, k, v, grad = (
        torch.randn(batch, heads, seq, HEAD_DIM, generator=gen).to("cuda", torch.float16) for _ in range(4)
    )
    z = (0.1 + 0.9 * torch.rand(batch, seq, generator=gen)).to("cuda")
    impls, _ = make_impls(structure, mask_mod, keep, dependent, batch, heads, seq)
    result = {"S": seq, "B": batch, "H": heads, "dtype": "float16", "mask": "causal"}
    for name in ("triton", "flex"):
        fn = impls[name]
        try:
            run_impl(fn, q, k, v, z, grad)  # compile / tune
            timed = time_impl(fn, q, k, v, z, grad, rep_ms)
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, z)]
            for phase in ("fwd", "fwd_bwd"):
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(calls):
                    out = fn(*leaves)
                    if phase == "fwd_bwd":
                        torch.autograd.grad(out, leaves, grad, allow_unused=True)
                host = (time.perf_counter() - start) / calls * 1e3
                torch.cuda.synchronize()
                timed[f"host_{phase}"] = host
            result[name] = timed
        except Exception as error:  # noqa: BLE001
            result[name] = {"error": f"{type(error).__name__}: {error}"[:500]}
    return result


def verdict(record: dict) -> dict:
    """Speed ratios flex/triton and sdpa/triton (> 1: triton faster) and PASS/MISS against GOAL."""
    ms = record["ms"]
    out = {"speed_vs_flex": {}, "speed_vs_sdpa": {}, "goal": {}}
    for phase in ("fwd", "fwd_bwd"):
        t = ms.get("triton", {}).get(phase)
        for other, key in (("flex", "speed_vs_flex"), ("sdpa", "speed_vs_sdpa")):
            o = ms.get(other, {}).get(phase)
            out[key][phase] = None if t is None or o is None else o / t
        ratio = out["speed_vs_flex"][phase]
        out["goal"][phase] = "n/a" if ratio is None else ("PASS" if ratio >= GOAL else "MISS")
    out["correct"] = triton_correct(record["max_abs_err"])
    return out


def triton_correct(errs: dict) -> bool:
    """Triton's error <= 3x the larger of flex's and sdpa's (same dtype) + 1% of the float32 magnitude."""
    tri = errs.get("triton", {})
    if "error" in tri:
        return False
    for part, err in tri.items():
        others = [errs[n][part] for n in ("flex", "sdpa") if part in errs.get(n, {}) and math.isfinite(errs[n][part])]
        if not err <= 3 * max(others + [0.0]) + 1e-2 * errs["float32_max_abs"][part]:
            return False
    return True


def table(records: list[dict]) -> str:
    head = ("| dtype | mask | S | B x H | triton fwd / fwd+bwd ms | flex ms | sdpa ms | vs flex (fwd, fwd+bwd) "
            "| goal >= 0.9x | correct |")
    lines = [head, "|" + "---|" * 10]

    def pair(ms):
        return "err" if not ms or "error" in ms else f"{ms['fwd']:.3f} / {ms['fwd_bwd']:.3f}"

    for r in records:
        if "ms" not in r:
            lines.append(f"| {r['dtype']} | {r['mask']} | {r['S']} | | {r.get('error', r.get('skipped', ''))[:60]} "
                         "| | | | | |")
            continue
        speed = r["speed_vs_flex"]
        fmt = lambda x: "n/a" if x is None else f"{x:.2f}x"  # noqa: E731
        lines.append(f"| {r['dtype']} | {r['mask']} | {r['S']} | {r['B']} x {r['H']} | {pair(r['ms'].get('triton'))} "
                     f"| {pair(r['ms'].get('flex'))} | {pair(r['ms'].get('sdpa'))} | {fmt(speed['fwd'])}, "
                     f"{fmt(speed['fwd_bwd'])} | {r['goal']['fwd']}, {r['goal']['fwd_bwd']} "
                     f"| {'yes' if r['correct'] else 'NO'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        log("attention_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was run.")
        return 2
    import triton

    for name, value in (("cache_size_limit", 512), ("recompile_limit", 512), ("accumulated_cache_size_limit", 4096),
                        ("accumulated_recompile_limit", 4096)):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, value)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "goal": f"triton >= {GOAL}x FlexAttention speed with soft token gates fused", "cases": []}
    began = time.perf_counter()
    results["host_overhead_ms"] = host_overhead(args.rep_ms)
    log(f"host overhead (S=128, ms; do_bench fwd/fwd_bwd and host_* = wall time per call without sync): "
        f"{results['host_overhead_ms']}")
    long_dtypes = args.long_dtypes.split(",")
    cases = [(s, d, m) for s in map(int, args.seq_lens.split(",")) for d in args.dtypes.split(",")
             for m in args.masks.split(",") if s < 8192 or d in long_dtypes]
    for number, (seq, dtype_name, mask) in enumerate(cases, 1):
        elapsed = time.perf_counter() - began
        if elapsed > args.budget_s:
            results["cases"].append({"dtype": dtype_name, "mask": mask, "S": seq,
                                     "skipped": f"time budget {args.budget_s:.0f}s spent"})
            continue
        log(f"[{number}/{len(cases)} {elapsed:.0f}s] {dtype_name} {mask} S={seq}")
        try:
            record = run_case(dtype_name, mask, seq, args)
            log(f"  ms {record['ms']}  vs flex {record['speed_vs_flex']}  goal {record['goal']}")
        except Exception as error:  # noqa: BLE001 - record and continue with the next case
            record = {"dtype": dtype_name, "mask": mask, "S": seq, "error": f"{type(error).__name__}: {error}"[:500],
                      "traceback": traceback.format_exc()[-2000:]}
            log(f"  FAILED: {record['error']}")
        finally:
            torch.cuda.empty_cache()
        results["cases"].append(record)
        results["wall_s"] = round(time.perf_counter() - began, 1)
        atomic_write_text(args.out, json.dumps(results, indent=1) + "\n")
    timed = [r for r in results["cases"] if "goal" in r]
    results["summary"] = {phase: {v: sum(r["goal"][phase] == v for r in timed) for v in ("PASS", "MISS", "n/a")}
                          for phase in ("fwd", "fwd_bwd")}
    results["wall_s"] = round(time.perf_counter() - began, 1)
    atomic_write_text(args.out, json.dumps(results, indent=1) + "\n")
    log(table(results["cases"]))
    log(f"summary {results['summary']}; {results['wall_s']}s; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

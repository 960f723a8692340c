"""Fill the cases that one GPU benchmark run skipped (its time budget spent) with the same cases
from a later run of ``attention_gpu.py`` on the same machine, and recompute the summary.

    python experiments/bench/merge_gpu_results.py FIRST.json LATER.json [...] --out MERGED.json
           --command "the command of each run, in order" [...]

Each merged case keeps every number its own run measured; ``merged_from`` names the runs and
each filled case carries ``"run": i`` (0 = FIRST). A case measured in FIRST is never replaced.
"""
import argparse
import json
import pathlib


def merge(first: dict, later: list[dict]) -> dict:
    merged = json.loads(json.dumps(first))
    for index, case in enumerate(merged["cases"]):
        if "skipped" not in case:
            continue
        where = (case["dtype"], case["mask"], case["S"])
        for run, other in enumerate(later, start=1):
            found = [c for c in other["cases"] if (c["dtype"], c["mask"], c["S"]) == where and "skipped" not in c]
            if found:
                merged["cases"][index] = {**found[0], "run": run}
                break
    timed = [c for c in merged["cases"] if "goal" in c]
    merged["summary"] = {phase: {v: sum(c["goal"][phase] == v for c in timed) for v in ("PASS", "MISS", "n/a")}
                         for phase in ("fwd", "fwd_bwd")}
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--command", action="append", default=[], help="the command of each run, in order")
    args = parser.parse_args()
    runs = [json.loads(path.read_text()) for path in args.runs]
    merged = merge(runs[0], runs[1:])
    merged["merged_from"] = [{"run": i, "wall_s": run.get("wall_s"), "command": cmd}
                             for i, (run, cmd) in enumerate(zip(runs, args.command + [None] * len(runs)))]
    args.out.write_text(json.dumps(merged, indent=1) + "\n")
    print(f"{args.out}: summary {merged['summary']}")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# One GPU session for the fused triton masked-attention kernels: versions, the CUDA tests of the
# triton backend, the forward/backward benchmark against compiled FlexAttention and SDPA (all 8
# cases at S = 4096: fp16, bf16 x causal, window, documents, padding), then the rest of the triton
# tests with whatever time is left. Every stage has a timeout and none stops the others; the whole
# run is capped at SESSION_S seconds (default 330) wall time, compile times included.
#
# Run from the repository root on the GPU machine:  bash experiments/bench/gpu_session.sh
# Results go to $OUT (default ./gpu-session-out): session.log, gpu-tests.log, bench.log,
# bench-attention-gpu.json (schema of paper/results/bench-attention-gpu.json), gpu-tests-more.log.

set +e
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/gpu-session-out}"
mkdir -p "$OUT"
SESSION_S="${SESSION_S:-330}"
START=$(date +%s)
PY="${PYTHON:-python3}"

left() {  # seconds left of the session, at most $1
    local rest=$((SESSION_S - ($(date +%s) - START)))
    if [ "$rest" -gt "$1" ]; then echo "$1"; elif [ "$rest" -gt 5 ]; then echo "$rest"; else echo 5; fi
}

stage() {  # stage NAME CAP_S LOG CMD...: runs CMD under timeout, tee'd to LOG, never stops the script
    local name=$1 cap=$2 log=$3
    shift 3
    local limit
    limit=$(left "$cap")
    echo "=== [$(( $(date +%s) - START ))s] $name (timeout ${limit}s) ===" | tee -a "$OUT/session.log"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "=== [$(( $(date +%s) - START ))s] $name: exit $rc$([ "$rc" = 124 ] && echo ' (timed out)') ===" \
        | tee -a "$OUT/session.log"
}

{
    echo "commit $(git rev-parse --short HEAD 2>/dev/null) $(git status --short 2>/dev/null | wc -l) changed files"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
} 2>&1 | tee -a "$OUT/session.log"

# (b) the kernels on the real GPU: every forward configuration, the log2-gate path, the tuned op at
# realistic shapes, and the three-way tests of each mask kind in fp32/fp16/bf16 (16 x 16 tiles).
stage "gpu tests" 110 "$OUT/gpu-tests.log" \
    "$PY" -m pytest -v --tb=short --maxfail=3 -p no:cacheprovider tests/test_triton_forward_variants.py \
    tests/test_triton_backend.py -k "cuda or variants or log2 or plan_flags or golden_forward_and_backward"

# (c) the benchmark with the new kernels (tile configurations tuned per case and recorded in the JSON).
stage "benchmark" 200 "$OUT/bench.log" \
    "$PY" experiments/bench/attention_gpu.py --seq-lens 4096 --budget-s 140 --out "$OUT/bench-attention-gpu.json"

# (b, continued) the rest of the triton backend tests, with the time left.
stage "more gpu tests" 60 "$OUT/gpu-tests-more.log" \
    "$PY" -m pytest -v --tb=short -p no:cacheprovider tests/test_triton_backend.py -k "not golden_forward_and_backward" \
    tests/test_ops_attention.py

echo "=== done in $(( $(date +%s) - START ))s; files in $OUT ===" | tee -a "$OUT/session.log"
ls -la "$OUT" | tee -a "$OUT/session.log"

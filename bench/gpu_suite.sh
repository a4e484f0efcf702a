#!/usr/bin/env bash
# The GPU speed suite: about five minutes on one H100/H200, SD1.5 shapes with random weights (no download).
#
# Run from the repository root. If the machine lacks the project's pins, bring them as wheels in .whl/:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 transformers==5.23.0 importlib_metadata
# Every part writes its JSON to $OUT (default bench/results/) as soon as it ends, under its own `timeout`,
# so one slow part cannot eat the others' time. Order: in-memory training step (batch 4, 16), sampling
# (batch 2, 50 steps), end to end (512 px, batch 4, bf16, 256 pairs), memory, then levers while time remains.
set -u
OUT=${OUT:-bench/results}
BUDGET_SECONDS=${BUDGET_SECONDS:-300}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
COMMON="--device cuda --shape sd15 --precision bf16"
STATUS="$OUT/gpu_suite_status.txt"
: > "$STATUS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu_suite_nvidia_smi.csv" 2>&1

part() {  # part NAME SECONDS SCRIPT ARGS...: run one benchmark under a time limit, log its exit status
    local name=$1 limit=$2 script=$3
    shift 3
    local started=$SECONDS
    timeout "$limit" python3 "bench/$script" $COMMON "$@" --out "$OUT/gpu_$name.json" > "$OUT/gpu_$name.log" 2>&1
    echo "$name exit $? after $((SECONDS - started)) s" | tee -a "$STATUS"
}

time_left() {  # time_left SECONDS: true while at least that much of the budget remains
    [ $((BUDGET_SECONDS - SECONDS)) -ge "$1" ]
}

part train_step_b4 90 train_step.py --batch 4 --steps 10 --warmup 3
part train_step_b16 110 train_step.py --batch 16 --steps 6 --warmup 2
part sample_b2_50 120 sample_step.py --batch 2 --steps 50 --warmup 2
part e2e_b4 180 train_e2e.py --batch 4 --pairs 256 --steps 30 --warmup 3 --rounds 1 --loader-workers 0,2
part memory_controlnet 60 train_step.py --batch 4 --impls tinylllite --steps 3 --warmup 1 --rounds 1 --no-flops
part memory_controlnet_gc 60 train_step.py --batch 4 --impls tinylllite --steps 3 --warmup 1 --rounds 1 --no-flops \
    --gradient-checkpointing
part memory_lllite 60 train_step.py --batch 4 --impls lllite --steps 3 --warmup 1 --rounds 1 --no-flops
part memory_diffusers 60 train_step.py --batch 4 --impls diffusers --steps 3 --warmup 1 --rounds 1 --no-flops
time_left 60 && part step_parts 60 step_parts.py --batch 4 --steps 10 --warmup 3  # fused AdamW, LLLite's embedding
time_left 60 && part lever_channels_last 60 train_step.py --batch 4 --impls tinylllite,diffusers --channels-last \
    --steps 10 --warmup 3 --no-flops
time_left 120 && part lever_e2e_cache 120 train_e2e.py --batch 4 --pairs 256 --steps 30 --warmup 3 --rounds 1 \
    --loader-workers 0 --tutorial-args="--cache --cache-dir /tmp/bench_cache"
time_left 120 && part lever_e2e_workers 120 train_e2e.py --batch 4 --pairs 256 --steps 30 --warmup 3 --rounds 1 \
    --loader-workers 4 --tutorial-args="--data-workers 4"
time_left 120 && part lever_compile 150 train_step.py --batch 4 --impls tinylllite,diffusers --compile \
    --steps 10 --warmup 5
echo "suite done after $SECONDS s" | tee -a "$STATUS"

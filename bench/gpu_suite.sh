#!/usr/bin/env bash
# The GPU suite: about eight minutes on one H100/H200, SD1.5 shapes with random weights (no download).
#
# Run from the repository root. If the machine lacks the project's pins, bring them as wheels in .whl/:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 transformers==5.23.0 importlib_metadata
# Every part writes its JSON to $OUT (default bench/results/) as soon as it ends, under its own `timeout`,
# so one slow part cannot eat the others' time; gpu_suite_status.txt lists each part's exit status.
# Order: the in-memory step against diffusers (eager and compiled, batch 4 and 16), memory of each branch
# beside the estimator, end to end, LLLite's sampling overhead, then what time allows: CUDA graphs and
# max-autotune, one SDXL LLLite step at 1024 px, the capped-card "fits" check and notebooks 05-07 on the GPU.
set -u
OUT=${OUT:-bench/results}
BUDGET_SECONDS=${BUDGET_SECONDS:-480}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
COMMON="--device cuda --shape sd15 --precision bf16"
STATUS="$OUT/gpu_suite_status.txt"
: > "$STATUS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu_suite_nvidia_smi.csv" 2>&1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >> "$STATUS" 2>&1

part() {  # part NAME SECONDS SCRIPT ARGS...: run one benchmark under a time limit, log its exit status
    local name=$1 limit=$2 script=$3
    shift 3
    local started=$SECONDS
    timeout "$limit" python3 "bench/$script" $COMMON "$@" --out "$OUT/gpu_$name.json" > "$OUT/gpu_$name.log" 2>&1
    echo "$name exit $? after $((SECONDS - started)) s" | tee -a "$STATUS"
}

estimate() {  # estimate NAME ARGS...: the memory estimator's JSON for one configuration (CPU only, no GPU used)
    local name=$1
    shift
    timeout 120 python3 -m tinylllite.memory --base sd15 --batch-size 4 --resolution 512 --mixed-precision bf16 \
        "$@" --bench-step --json > "$OUT/gpu_estimate_$name.json" 2> "$OUT/gpu_estimate_$name.log" &
}

time_left() {  # time_left SECONDS: true while at least that much of the budget remains
    [ $((BUDGET_SECONDS - SECONDS)) -ge "$1" ]
}

# the estimates run on the CPU cores while the GPU parts run
estimate controlnet --control controlnet
estimate controlnet_gc --control controlnet --gradient-checkpointing
estimate lllite --control lllite
estimate lllite_gc --control lllite --gradient-checkpointing

part train_step_b4 150 train_step.py --batch 4 --steps 10 --warmup 3 --impls tinylllite,diffusers,tinylllite-compiled
part train_step_b16 90 train_step.py --batch 16 --steps 6 --warmup 2 --impls tinylllite,diffusers --no-flops
part memory_controlnet 45 train_step.py --batch 4 --impls tinylllite --steps 3 --warmup 1 --rounds 1 --no-flops
part memory_controlnet_gc 45 train_step.py --batch 4 --impls tinylllite --steps 3 --warmup 1 --rounds 1 --no-flops \
    --gradient-checkpointing
part memory_lllite 45 train_step.py --batch 4 --impls lllite --steps 3 --warmup 1 --rounds 1 --no-flops
part memory_lllite_gc 45 train_step.py --batch 4 --impls lllite --steps 3 --warmup 1 --rounds 1 --no-flops \
    --gradient-checkpointing
part e2e_b4 150 train_e2e.py --batch 4 --pairs 256 --steps 30 --warmup 3 --rounds 1 --loader-workers 0,4 \
    --tutorial-args="--data-workers 4"
part sample_b8 90 sample_step.py --batch 8 --steps 20 --warmup 2 --variants plain,controlnet,lllite
time_left 120 && part train_step_cudagraphs 120 train_step.py --batch 4 --steps 10 --warmup 5 --no-flops \
    --impls tinylllite,tinylllite-compiled --compile-mode reduce-overhead
time_left 150 && part train_step_autotune 150 train_step.py --batch 4 --steps 10 --warmup 5 --no-flops \
    --impls tinylllite,tinylllite-compiled --compile-mode max-autotune-no-cudagraphs
time_left 90 && part sdxl_lllite_1024 90 train_step.py --shape sdxl --batch 1 --impls lllite --steps 3 --warmup 1 \
    --rounds 1 --no-flops
other() {  # other NAME SECONDS SCRIPT ARGS...: a script with its own flags (not train_step's), under a time limit
    local name=$1 limit=$2 script=$3
    shift 3
    local started=$SECONDS
    timeout "$limit" python3 "bench/$script" "$@" --out "$OUT/gpu_$name.json" > "$OUT/gpu_$name.log" 2>&1
    echo "$name exit $? after $((SECONDS - started)) s" | tee -a "$STATUS"
}
time_left 150 && other fits_check 150 fits_check.py --cards 8 12
time_left 150 && other notebooks 150 notebooks_on_gpu.py --steps 30
wait  # the estimator's JSON
echo "suite done after $SECONDS s" | tee -a "$STATUS"

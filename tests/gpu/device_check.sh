#!/usr/bin/env bash
# GPU readiness check for a machine with a GPU and no network, run from the repository root:
#
#   bash tests/gpu/device_check.sh          every step below, in under 8 minutes
#   bash tests/gpu/device_check.sh --dry    (or DRY=1) check that every path and Python module the steps
#                                           name exists and print the commands; runs nothing heavy
#
# Steps: GPU and torch info; the toolchain; build expertmesh._C with its CUDA kernels for sm_90 (H100/H200)
# and check they registered; tests/gpu; 30 training steps on CUDA in bf16 with and without torch.compile;
# the Triton kernels' tests compiled for the GPU and their benchmark; the moe_ops and moe_layer benchmarks. Each step logs to <logs>/<step>.log, <logs> being $OUT/device_check
# when OUT is set, else ./device_check_out. A failed step does not stop the ones after it (a failed build
# still leaves the reference MoE path to train and benchmark); the exit status is 1 if any step failed, and
# <logs>/summary.json lists every step's name, rc and seconds. Each step has its own timeout, and together
# they share DEVICE_CHECK_BUDGET seconds (450 by default), so the whole stays under 8 minutes however slow
# one step is: a step that starts late gets what is left, and one left without time is skipped.
#
# PY picks the Python (default: python, else python3). EXPERTMESH_ROOT points at another checkout
# (default: the one this script is in).
set -u

DRY=${DRY:-0}
[[ ${1:-} == --dry ]] && DRY=1
ROOT=${EXPERTMESH_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
LOG=${OUT:+$OUT/device_check}
LOG=${LOG:-device_check_out}
[[ $LOG == /* ]] || LOG=$PWD/$LOG
PY=${PY:-$(command -v python || command -v python3 || echo python3)}
[[ $PY == */* && $PY != /* ]] && PY=$PWD/$PY  # a relative PY must survive the cd below
BUDGET=${DEVICE_CHECK_BUDGET:-450}
RUNS=${TMPDIR:-/tmp}/expertmesh_device_check_runs.$$  # checkpoints stay here, out of $OUT

# Everything the steps below read or run; --dry fails naming any that is missing.
PATHS=(setup.py pyproject.toml csrc csrc/build_flags.py configs/default.toml tests/gpu tests/gpu/test_cuda_compile.py
       expertmesh/launch/cli.py expertmesh/moe/ops.py benchmarks/benchlib.py benchmarks/moe_ops.py
       benchmarks/moe_layer.py tests/unit/test_triton_ops.py benchmarks/triton_moe.py expertmesh/moe/triton_ops.py)
MODULES=(pip pytest torch expertmesh.launch.cli)

cd "$ROOT" || { echo "device_check: no repository at $ROOT"; exit 1; }
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # expertmesh importable even if the editable install fails
# nvcc where CUDA images keep it, if it is not on PATH already (setup.py builds the kernels only with nvcc).
for d in "${CUDA_HOME:-}/bin" /usr/local/cuda/bin; do
    if ! command -v nvcc >/dev/null && [[ -x $d/nvcc ]]; then export PATH="$d:$PATH"; fi
done

NAMES=() RCS=() SECS=()
START=$SECONDS

write_summary() {
    local i sep=""
    {
        echo "["
        for i in "${!NAMES[@]}"; do
            printf '%s  {"name": "%s", "rc": %s, "seconds": %s}' "$sep" "${NAMES[$i]}" "${RCS[$i]}" "${SECS[$i]}"
            sep=$',\n'
        done
        printf '\n]\n'
    } >"$LOG/summary.json"
}

show() {  # a command line as a reader would type it
    local a
    for a; do
        if [[ $a =~ [[:space:]\;\"\(] ]]; then printf " '%s'" "$a"; else printf ' %s' "$a"; fi
    done
    echo
}

# run_step NAME TIMEOUT_S COMMAND...: runs COMMAND under timeout into <logs>/NAME.log and records it.
# A step skipped for want of budget is recorded with rc -1.
run_step() {
    local name=$1 limit=$2 rc t0
    shift 2
    if [[ $DRY == 1 ]]; then
        printf '[dry] %s (timeout %ss):' "$name" "$limit"; show "$@"
        return 0
    fi
    local left=$((BUDGET - (SECONDS - START)))
    ((limit > left)) && limit=$left
    t0=$SECONDS
    if ((limit < 5)); then
        echo "== $name: skipped, the ${BUDGET}s budget is spent"
        rc=-1
    else
        echo "== $name (timeout ${limit}s)"
        { printf '$'; show "$@"; } >"$LOG/$name.log"
        timeout -k 5 "$limit" "$@" >>"$LOG/$name.log" 2>&1
        rc=$?
        ((rc == 124 || rc == 137)) && echo "timed out after ${limit}s" >>"$LOG/$name.log"
    fi
    NAMES+=("$name") RCS+=("$rc") SECS+=($((SECONDS - t0)))
    echo "$name rc=$rc $((SECONDS - t0))s"
    if ((rc > 0)); then tail -n 20 "$LOG/$name.log" | sed 's/^/    /'; fi
    write_summary
}

dry_check() {
    local p missing=0
    for p in "${PATHS[@]}"; do
        if [[ ! -e $ROOT/$p ]]; then echo "device_check: missing $ROOT/$p"; missing=1; fi
    done
    if ! command -v "$PY" >/dev/null; then
        echo "device_check: missing python: $PY"
        return 1
    fi
    "$PY" - "${MODULES[@]}" <<'EOF' || missing=1
import importlib.util, sys
def found(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False
absent = [m for m in sys.argv[1:] if not found(m)]
for m in absent:
    print(f"device_check: missing python module {m} (for {sys.executable})")
sys.exit(1 if absent else 0)
EOF
    command -v timeout >/dev/null || { echo "device_check: missing the timeout command"; missing=1; }
    return $missing
}

train_step() {  # train_step NAME COMPILE TIMEOUT_S: 30 bf16 steps on one GPU; its metrics.jsonl goes to the logs
    local name=$1 compile=$2
    run_step "$name" "$3" "$PY" -m expertmesh.launch.cli run --config configs/default.toml --nproc 1 \
        train.steps=30 train.device=cuda train.mixed_precision=bf16 "train.compile=$compile" \
        "train.name=$name" "train.run_dir=$RUNS" metrics.wandb_mode=disabled
    [[ $DRY == 1 ]] || cp "$RUNS/$name/metrics.jsonl" "$LOG/$name.metrics.jsonl" 2>/dev/null
}

if [[ $DRY == 1 ]]; then
    dry_check || exit 1
    echo "device_check: all paths and modules present (root $ROOT, python $PY); would log to $LOG"
else
    mkdir -p "$LOG" "$RUNS" && touch "$RUNS/.start"  # results older than this are not this run's
    echo "device_check: root $ROOT, python $PY, logs $LOG, budget ${BUDGET}s"
fi

run_step nvidia_smi 20 nvidia-smi
run_step torch_cuda 30 "$PY" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'
run_step toolchain 15 bash -c 'nvcc --version && { ninja --version || echo "no ninja: the build compiles one file at a time"; }'
run_step build 200 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install -v --no-deps --no-build-isolation -e .
run_step cuda_ops 30 "$PY" -c 'from expertmesh.moe import ops; assert ops.cuda_ops_available(), "no CUDA kernels"'
run_step pytest_gpu 180 env MAX_JOBS=16 EXPERTMESH_REPORT_DIR="$LOG" "$PY" -m pytest -q -rA tests/gpu -p no:cacheprovider
train_step train_compile true 90
train_step train_eager false 60
# DiLoCo's exchange overlapping the inner steps (its own stream and thread): two workers need two GPUs (NCCL puts no
# two ranks on one device). One large fragment synced every 4 steps; compare the step time of overlap 1 with 0.
if [[ $DRY == 1 ]] || (($(nvidia-smi -L 2>/dev/null | wc -l) >= 2)); then
    for ov in 0 1; do
        run_step "diloco_overlap$ov" 90 "$PY" -m expertmesh.launch.cli run --config configs/default.toml --nproc 2 \
            train.steps=24 train.device=cuda parallel.dp_replicate=2 diloco.enabled=true diloco.sync_every=4 \
            diloco.fragments=1 "diloco.overlap=$ov" model.dim=1024 model.n_layers=8 "train.name=diloco_overlap$ov" \
            "train.run_dir=$RUNS" metrics.log_every=4 metrics.wandb_mode=disabled
        [[ $DRY == 1 ]] || cp "$RUNS/diloco_overlap$ov/metrics.jsonl" "$LOG/diloco_overlap$ov.metrics.jsonl" 2>/dev/null
    done
else
    echo "== diloco_overlap: skipped, one GPU (two workers need two)"
fi
run_step pytest_triton 120 "$PY" -m pytest -q -rA tests/unit/test_triton_ops.py -p no:cacheprovider
run_step bench_triton_moe 90 "$PY" benchmarks/triton_moe.py
run_step bench_moe_ops 60 "$PY" benchmarks/moe_ops.py
run_step bench_moe_layer 90 "$PY" benchmarks/moe_layer.py

if [[ $DRY == 1 ]]; then
    echo "[dry] then copy the benchmarks/results/*_cuda.json they write to $LOG/results/"
    exit 0
fi
mapfile -t results < <(find benchmarks/results -maxdepth 1 -name '*_cuda.json' -newer "$RUNS/.start" 2>/dev/null)
if ((${#results[@]})); then mkdir -p "$LOG/results" && cp "${results[@]}" "$LOG/results/"; fi
rm -rf "$RUNS"

failed=0
echo "== summary (${LOG}/summary.json), $((SECONDS - START))s in all"
for i in "${!NAMES[@]}"; do
    printf '%-16s rc=%-4s %4ss\n' "${NAMES[$i]}" "${RCS[$i]}" "${SECS[$i]}"
    [[ ${RCS[$i]} == 0 ]] || failed=1
done
exit $failed

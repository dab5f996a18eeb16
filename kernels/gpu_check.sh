#!/usr/bin/env bash
# One-shot GPU check of the fused personalized_scm kernel (issue 5), under 8 minutes in all:
#   1. tests/test_kernels.py natively on the GPU (TRITON_INTERPRET=0)          <= 150 s
#   2. kernels.bench on the goal shapes, fused vs eager vs torch.compile         <= 110 s
#   3. kernels.bench on a wider grid, fused vs eager (no compile), and the goal
#      rows again without the NaN fill of the output buffers                     <= 60 + 25 s
#   4. one epoch of train.py --data synthetic with --kernel triton, then eager   <= 2 x 60 s
# Everything goes to OUTDIR: one log per step, CSVs, the run folders, summary.txt.
# Usage: kernels/gpu_check.sh OUTDIR      (PYTHON=... to choose the interpreter)
set -u
OUT=${1:?usage: kernels/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."

# A python whose torch sees CUDA: $PYTHON, else the venv, else python3 / python.
PY=""
for cand in ${PYTHON:-} .venv/bin/python python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch, triton, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
        PY=$cand
        break
    fi
done
if [ -z "$PY" ]; then
    echo "no python with a CUDA torch and triton found" | tee "$OUT/summary.txt"
    exit 1
fi
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1

SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
{
    echo "gpu_check $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo +dirty)"
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, '|', torch.cuda.get_device_name())"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader 2>/dev/null
} | tee -a "$SUMMARY"

step() {   # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0 t1 rc
    t0=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    local line
    line=$(printf '%-16s rc=%-3s wall=%6.1fs%s' "$name" "$rc" "$(awk "BEGIN{print $t1 - $t0}")" \
           "$([ "$rc" = 124 ] && echo '  (timed out)')")
    echo "$line" | tee -a "$SUMMARY"
    tail -n 25 "$OUT/$name.log"
}

step tests 150 env KERNEL_TEST_EXAMPLES=12 "$PY" -m pytest tests/test_kernels.py -p no:cacheprovider -q --durations=8
step bench_goal 110 "$PY" -m kernels.bench --B 4096 65536 --Nm 8 --N 8 --d 8 --csv "$OUT/bench_goal.csv"
step bench_grid 60 "$PY" -m kernels.bench --no-compile --B 4096 65536 --Nm 1 16 --N 8 16 --d 8 32 \
    --csv "$OUT/bench_grid.csv"
step bench_poison 25 "$PY" -m kernels.bench --no-compile --poison --B 4096 65536 --Nm 8 --N 8 --d 8 \
    --csv "$OUT/bench_poison.csv"
for kernel in triton eager; do
    step "train_$kernel" 60 "$PY" train.py --data synthetic --epochs 1 --kernel "$kernel" --device cuda \
        --out "$OUT/train_$kernel"
done

echo "== goals and train metrics" | tee -a "$SUMMARY"
grep -h "^goal\|^device:" "$OUT"/bench_*.log | tee -a "$SUMMARY"
for kernel in triton eager; do
    echo "-- train_$kernel: last lines" | tee -a "$SUMMARY"
    tail -n 6 "$OUT/train_$kernel.log" | tee -a "$SUMMARY"
done
echo "done; everything is in $OUT"

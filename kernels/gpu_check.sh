#!/usr/bin/env bash
# One-shot GPU check of the fused personalized_scm kernel (issues 5, 10 and 21).
#
#   kernels/gpu_check.sh OUTDIR [STEP ...]      (PYTHON=... chooses the interpreter)
#
# Steps, in priority order (all of them when none is named):
#   tests         tests/test_kernels.py natively (TRITON_INTERPRET=0), hypothesis profile
#                 "native": fixed seed, narrowed shapes, so few cold compiles; includes the
#                 registered op under torch.compile (inductor) and CUDA-graph replays
#   bench_goal    kernels.bench on the goal shapes (B 4096 and 65536, N_m 8, N 8, d 8): fused and
#                 eager (solve / solve_ex, noise as input or drawn in the op), each checked
#                 before it is timed; registers and spills per kernel variant
#   bench_ablate  what bounds the kernel, at the goal shapes: the model path (fused_philox) against
#                 uniforms given (fused), no top-K, no elimination, neither, and masked-sum reads
#                 instead of tl.gather ("ablation" lines in the summary)
#   bench_compile the B 4096 goal shape against torch.compile, with and without CUDA graphs, and
#                 the fused op itself replayed from a CUDA graph (fused_cudagraphs); slow cold
#                 compiles, so a step of its own
#   train_triton  one epoch of train.py with --kernel triton (ML-1M if its files are present in
#                 ./data/ml-1m or $PLANREC_DATA/ml-1m, else --data synthetic); TRAIN_MAX_STEPS caps it
#   train_eager   the same with --kernel eager
#   bench_grid    a wider grid, fused vs eager (no compile)
#   bench_poison  the goal shapes again with the tests' NaN fill of the outputs
#   bench_sweep   the fused kernel's launch parameters (rows or examples per program x warps) at the
#                 goal shapes, to re-tune NUM_WARPS / BACKWARD_NUM_WARPS / TILE_ELEMENTS on a new card
#
# Each step gets a time limit for cold compiles, capped by what is left of the whole run's budget
# (GPU_CHECK_BUDGET_S, default 480 s: one device call of about 8 minutes that always ends with
# its summary); LIMIT_<step>=seconds overrides a step's own limit. With every step named (the
# default), the training steps are the ones the budget may skip. A step whose dependencies
# are missing is skipped and says which; the others
# still run. Everything goes to OUTDIR: one log per step, CSVs (written row by row), the run
# folders, summary.txt.
set -u
OUT=${1:?usage: kernels/gpu_check.sh OUTDIR [STEP ...]}
shift
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
ALL_STEPS="tests bench_goal bench_ablate bench_compile train_triton train_eager bench_grid bench_poison bench_sweep"
STEPS=${*:-$ALL_STEPS}
for s in $STEPS; do
    case " $ALL_STEPS " in *" $s "*) ;; *) echo "unknown step $s (steps: $ALL_STEPS)"; exit 2 ;; esac
done
BUDGET=${GPU_CHECK_BUDGET_S:-480}
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

# A python with torch: $PYTHON, else the venv, else python3 / python.
PY=""
for cand in ${PYTHON:-} .venv/bin/python python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" 2>/dev/null; then
        PY=$cand
        break
    fi
done
if [ -z "$PY" ]; then
    echo "no python with torch found (tried \$PYTHON, .venv/bin/python, python3, python): nothing can run" | tee -a "$SUMMARY"
    exit 1
fi
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1

# What is installed: one word per missing dependency.
MISSING=$("$PY" - <<'EOF'
import importlib.util, torch
missing = [m for m in ("triton", "pytest", "hypothesis", "numpy", "tqdm") if importlib.util.find_spec(m) is None]
if not torch.cuda.is_available():
    missing.append("CUDA")
print(" ".join(missing))
EOF
)
needs() {   # needs STEP -> the dependencies of that step
    case $1 in
        tests) echo "triton CUDA pytest hypothesis" ;;
        bench_*) echo "triton CUDA" ;;
        train_triton) echo "triton CUDA numpy tqdm" ;;
        train_eager) echo "CUDA numpy tqdm" ;;
    esac
}
limit_of() {   # limits with room for cold compiles (~50 kernel variants in the tests, torch.compile per shape)
    # LIMIT_<step>=seconds overrides one step's limit (e.g. LIMIT_tests=120)
    local override
    override=$(printenv "LIMIT_$1")
    [ -n "$override" ] && { echo "$override"; return; }
    case $1 in
        tests) echo 200 ;; bench_goal) echo 80 ;; bench_ablate) echo 80 ;; bench_compile) echo 110 ;;
        train_*) echo 90 ;; bench_grid) echo 150 ;; bench_poison) echo 60 ;; bench_sweep) echo 240 ;;
    esac
}

{
    echo "gpu_check $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo +dirty)"
    "$PY" -c "
import torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = 'missing'
cuda = torch.cuda.is_available()
print('python', __import__('sys').version.split()[0], '| torch', torch.__version__, '| triton', tv, '| cuda', torch.version.cuda,
      '|', torch.cuda.get_device_name() if cuda else 'no CUDA device')"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader 2>/dev/null
    echo "missing: ${MISSING:-nothing}; steps: $STEPS; budget ${BUDGET}s"
} | tee -a "$SUMMARY"

DATA=synthetic
for dir in data/ml-1m "${PLANREC_DATA:-/nonexistent}/ml-1m"; do
    [ -f "$dir/ratings.dat" ] && DATA=ml-1m && break
done

step() {   # step NAME COMMAND...
    local name=$1
    shift
    local dep missing_here=""
    for dep in $(needs "$name"); do
        case " $MISSING " in *" $dep "*) missing_here="$missing_here $dep" ;; esac
    done
    if [ -n "$missing_here" ]; then
        printf '%-16s skipped (missing:%s)\n' "$name" "$missing_here" | tee -a "$SUMMARY"
        return
    fi
    local left=$(( BUDGET - ($(date +%s) - START) - 15 ))      # 15 s kept for the summary
    local limit
    limit=$(limit_of "$name")
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        printf '%-16s skipped (budget spent)\n' "$name" | tee -a "$SUMMARY"
        return
    fi
    echo "== $name (limit ${limit}s): $*"
    local t0 t1 rc
    t0=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    printf '%-16s rc=%-3s wall=%6.1fs%s\n' "$name" "$rc" "$(awk "BEGIN{print $t1 - $t0}")" \
        "$([ "$rc" = 124 ] || [ "$rc" = 137 ] && echo '  (timed out)')" | tee -a "$SUMMARY"
    tail -n 25 "$OUT/$name.log"
}

GOAL="--B 4096 65536 --Nm 8 --N 8 --d 8"
for s in $STEPS; do
    case $s in
        tests) step tests env KERNEL_TEST_PROFILE=native "$PY" -m pytest tests/test_kernels.py -p no:cacheprovider \
                   -q --durations=8 ;;
        bench_goal) step bench_goal "$PY" -m kernels.bench --no-compile $GOAL --csv "$OUT/bench_goal.csv" ;;
        bench_ablate) step bench_ablate "$PY" -m kernels.bench --no-compile --impls fused fused_philox \
                          fused_philox_nogather ablate_fixed_mask ablate_no_solve ablate_fixed_mask_no_solve \
                          $GOAL --csv "$OUT/bench_ablate.csv" ;;
        bench_compile) step bench_compile "$PY" -m kernels.bench --impls fused eager_solve eager_solve_ex compile \
                           compile_cudagraphs fused_cudagraphs --B 4096 --Nm 8 --N 8 --d 8 --csv "$OUT/bench_compile.csv" ;;
        bench_grid) step bench_grid "$PY" -m kernels.bench --no-compile --impls fused eager_solve fused_philox eager_rand \
                        --B 4096 65536 --Nm 1 16 --N 8 16 --d 8 32 --csv "$OUT/bench_grid.csv" ;;
        bench_sweep) step bench_sweep "$PY" -m kernels.bench --sweep --csv "$OUT/bench_sweep.csv" ;;
        bench_poison) step bench_poison "$PY" -m kernels.bench --no-compile --poison --impls fused fused_philox $GOAL \
                          --csv "$OUT/bench_poison.csv" ;;
        train_triton|train_eager)
            step "$s" "$PY" train.py --data "$DATA" --epochs 1 ${TRAIN_MAX_STEPS:+--max-steps "$TRAIN_MAX_STEPS"} \
                --kernel "${s#train_}" --device cuda --out "$OUT/$s" ;;
    esac
done

echo "== tests, goals, ablations, correctness, kernel variants, training" | tee -a "$SUMMARY"
[ -f "$OUT/tests.log" ] && grep -E "passed|failed|error" "$OUT/tests.log" | tail -n 1 | sed 's/^/tests: /' | tee -a "$SUMMARY"
grep -h "^goal\|^ablation\|^device:\|^WRONG\|^failed\|^kernel variant\|^sweep best" "$OUT"/bench_*.log 2>/dev/null | sort -u | tee -a "$SUMMARY"
for kernel in triton eager; do
    [ -f "$OUT/train_$kernel/metrics.json" ] || continue
    "$PY" -c "
import json, sys
m = json.load(open(sys.argv[1]))
for e in m['epochs']:
    print(f\"train_$kernel ($DATA): epoch {e['epoch']} train {e['train_s']:.1f}s eval {e['eval_s']:.1f}s\")" \
        "$OUT/train_$kernel/metrics.json" | tee -a "$SUMMARY"
    # tqdm's last rate on the training bar: steps per second
    tr '\r' '\n' < "$OUT/train_$kernel.log" | grep -o "epoch 1: 100%.*" | tail -n 1 | sed "s/^/train_$kernel: /" | tee -a "$SUMMARY"
done
echo "done in $(( $(date +%s) - START ))s; everything is in $OUT"

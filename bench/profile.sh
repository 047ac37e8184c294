#!/usr/bin/env bash
# Where the CPU time goes: perf profiles of sy_bench's Switch layer and tiny train step, grouped
# into categories (GEMM kernel, GEMM packing, fp64 accumulation, gelu, LayerNorm, ...), for
# each OpenBLAS kernel family this CPU can run (docs/performance.md "Where the time goes").
#
#   bench/profile.sh [--threads N] [--build DIR] [--family NAME ...]
#
# One thread by default: the profile then shows work, not OpenMP waiting. Needs linux-perf
# (apt-get install linux-perf). Percentages are of all samples of the process, including the
# untimed set-up (input generation, page faults), which is listed as its own category.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=$ROOT/build
THREADS=1
FAMILIES=()
while [ $# -gt 0 ]; do
    case "$1" in
    --threads) THREADS=$2; shift ;;
    --build) BUILD=$2; shift ;;
    --family) FAMILIES+=("$2"); shift ;;
    -h | --help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench/profile.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
command -v perf >/dev/null || { echo "bench/profile.sh: perf not found (apt-get install linux-perf)" >&2; exit 1; }
cmake --build "$BUILD" -j"$(nproc)" --target sy_bench >/dev/null
. "$ROOT/bench/families.sh"
TMP=$(mktemp -d /tmp/sy-profile.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
echo "commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown); $(lscpu | sed -n 's/^Model name: *//p'); $THREADS thread(s)"
for FAM in "${FAMILIES[@]}"; do
    for MODE in "switch --skew 0.7" "step --config $ROOT/configs/tiny.yaml"; do
        OPENBLAS_CORETYPE=$FAM perf record -q -o "$TMP/perf.data" "$BUILD/bench/sy_bench" $MODE \
            --threads "$THREADS" --iters 12 --warmup 1 > "$TMP/out" 2>&1
        echo "== $FAM: ${MODE%% *} ($(grep -m1 -o 'median.*' "$TMP/out"))"
        perf report -i "$TMP/perf.data" --no-children --sort symbol 2>/dev/null | grep -E '^ +[0-9]' |
            python3 -c '
import re, sys
rules = [("GEMM kernel (OpenBLAS)", r"sgemm_kernel|sgemm_small_kernel"),
         ("GEMM packing (OpenBLAS copies)", r"copy_"),
         ("GEMM C zeroing (OpenBLAS beta)", r"sgemm_beta"),
         ("tile epilogue (fp64 accumulation, bf16)", r"run_tile|epilogue"),
         ("gelu fwd/bwd", r"gelu"),
         ("LayerNorm fwd/bwd", r"layernorm"),
         ("attention softmax", r"softmax"),
         ("cross-entropy", r"xent"),
         ("optimizer and gradient passes", r"adamw|sqnorm|clip|model_grads|fwd_bwd\._omp"),
         ("router, dispatch, combine", r"router|gather|scatter|switch_route|capacity"),
         ("memset/memcpy", r"memset|memmove|memcpy"),
         ("OpenMP runtime", r"gomp|GOMP"),
         ("set-up and page faults (untimed)", r"rng|cos|log|fill_normal|page|folio|memcg|clear_page|spin_lock|list_")]
cat = {}
for line in sys.stdin:
    pct, name = line.split(None, 1)
    name = name.split("]", 1)[-1].strip()
    k = next((label for label, rx in rules if re.search(rx, name)), "other")
    cat[k] = cat.get(k, 0.0) + float(pct.rstrip("%"))
for k, v in sorted(cat.items(), key=lambda kv: -kv[1]):
    print(f"   {v:5.1f} %  {k}")
'
    done
done

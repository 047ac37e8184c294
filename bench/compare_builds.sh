#!/usr/bin/env bash
# Two builds of switchyard side by side in one run: `sy_bench switch` (one Switch layer fwd+bwd,
# the training path) and `sy_bench step` (one optimizer step of a config), alternating A, B, A, B
# ... so that both see the same machine, on each OpenBLAS kernel family this CPU can execute.
#
#   bench/compare_builds.sh BUILD_A BUILD_B [--rounds N] [--config FILE] [--family NAME ...]
#
# BUILD_A/BUILD_B: build folders holding bench/sy_bench (for example a worktree of an older
# commit: git worktree add /tmp/old COMMIT && cmake -S /tmp/old -B /tmp/old/build &&
# cmake --build /tmp/old/build --target sy_bench). --config: the config both steps read (it must
# parse for both builds; default configs/tiny.yaml of BUILD_A's source). Prints every run and,
# per family and case, the medians and B / A (> 1: B slower). Run it on an otherwise idle
# machine: it measures wall-clock time.
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
A=$1; B=$2; shift 2
ROUNDS=5
CONFIG=
FAMILIES=()
while [ $# -gt 0 ]; do
    case "$1" in
    --rounds) ROUNDS=$2; shift ;;
    --config) CONFIG=$2; shift ;;
    --family) FAMILIES+=("$2"); shift ;;
    -h | --help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench/compare_builds.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
for b in "$A" "$B"; do
    [ -x "$b/bench/sy_bench" ] || { echo "bench/compare_builds.sh: no $b/bench/sy_bench (build it: cmake --build $b --target sy_bench)" >&2; exit 2; }
done
if [ -z "$CONFIG" ]; then
    CONFIG=$(sed -n 's/^CMAKE_HOME_DIRECTORY:INTERNAL=//p' "$A/CMakeCache.txt")/configs/tiny.yaml
fi
if [ ${#FAMILIES[@]} -eq 0 ]; then
    if [ -n "${OPENBLAS_CORETYPE:-}" ]; then FAMILIES=("$OPENBLAS_CORETYPE")
    else
        grep -qw avx512f /proc/cpuinfo && FAMILIES+=(SkylakeX)
        grep -qw avx2 /proc/cpuinfo && grep -qw fma /proc/cpuinfo && FAMILIES+=(Haswell)
    fi
fi
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT
echo "== A: $A  B: $B  config: $CONFIG  rounds: $ROUNDS  $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
for fam in "${FAMILIES[@]}"; do
    for r in $(seq "$ROUNDS"); do
        for side in A B; do
            b=$A; [ $side = B ] && b=$B
            s=$(OPENBLAS_CORETYPE=$fam OMP_NUM_THREADS=2 "$b/bench/sy_bench" switch --threads 2 --iters 20 --warmup 2 2>&1 |
                grep -o 'fwd+bwd [0-9.]* ms' | head -1 | awk '{print $2}')
            t=$(OPENBLAS_CORETYPE=$fam OMP_NUM_THREADS=2 "$b/bench/sy_bench" step --threads 2 --iters 15 --warmup 2 --config "$CONFIG" 2>&1 |
                grep -o '[0-9.]* ms/step' | head -1 | awk '{print $1}')
            echo "$fam $r $side switch ${s:-?} step ${t:-?}" | tee -a "$OUT"
        done
    done
done
/usr/bin/python3 - "$OUT" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
for fam in dict.fromkeys(r[0] for r in rows):
    for k, case in ((4, "switch fwd+bwd"), (6, "tiny step")):
        med = {}
        for side in "AB":
            v = [float(r[k]) for r in rows if r[0] == fam and r[2] == side and r[k] != "?"]
            med[side] = statistics.median(v) if v else float("nan")
        print(f"{fam:9s} {case:15s} A {med['A']:8.2f} ms  B {med['B']:8.2f} ms  B / A {med['B'] / med['A']:.3f}")
PY

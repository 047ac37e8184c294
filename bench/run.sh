#!/usr/bin/env bash
# switchyard vs PyTorch on this CPU, in one command (see docs/performance.md).
#
#   bench/run.sh [--quick] [--threads N] [--build DIR] [--family NAME ...] [--pypi-torch]
#                [--rounds N]
#
# Builds bench/sy_bench if needed (in DIR, default ./build, the project's default build type),
# then, for each OpenBLAS kernel family this CPU can execute (SkylakeX with AVX-512, Haswell
# with AVX2+FMA; --family picks; a machine that sets OPENBLAS_CORETYPE keeps its own), runs one
# process at a time (never concurrently):
#   sgemm   cblas_sgemm 2048^3 (OpenBLAS's own threading) and sy_sgemm (fixed tiles), torch.mm
#   switch  one Switch layer fwd+bwd, the training path (fp64 gradient accumulators): G=2048
#           tokens, D=512, F=2048, E=8, capacity factor 1.25, balanced routing (no drops)
#   skew    the same with skewed routing (--skew 0.7: about 27 % of tokens dropped)
#   step    one optimizer step of configs/tiny.yaml (2 micro-batches of 8x128 tokens)
# against Debian's torch (python3-torch, same OpenBLAS and kernel family) and, with
# --pypi-torch, the current torch from PyPI (its own MKL/oneDNN; installed on first use into
# $SY_TORCH_VENV, default build/bench-venv, about 5 GB, never into the test path; in the Haswell
# table it is held to AVX2 too: MKL_ENABLE_INSTRUCTIONS=AVX2, ONEDNN_MAX_CPU_ISA=AVX2,
# ATEN_CPU_CAPABILITY=avx2). One table per family. The C side
# writes its inputs and the PyTorch side loads them, so both do the same routing load.
# --rounds N (default 1) repeats the whole sequence N times, the families alternating within
# each round, and ends with one summary per family: each ratio paired within its round (both
# sides measured minutes apart), its median, range and how many rounds meet issue 8's target.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=$ROOT/build
THREADS=2
QUICK=0
PYPI=0
ROUNDS=1
FAMILIES=()
PY=/usr/bin/python3
while [ $# -gt 0 ]; do
    case "$1" in
    --quick) QUICK=1 ;;
    --threads) THREADS=$2; shift ;;
    --build) BUILD=$2; shift ;;
    --family) FAMILIES+=("$2"); shift ;;
    --pypi-torch) PYPI=1 ;;
    --rounds) ROUNDS=$2; shift ;;
    -h | --help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench/run.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || { echo "bench/run.sh: --rounds needs a positive integer, not '$ROUNDS'" >&2; exit 2; }

if [ "$QUICK" = 1 ]; then
    SGEMM_IT=3; SW_IT=5; SW_WU=1; ST_IT=3; ST_WU=1
else
    SGEMM_IT=7; SW_IT=20; SW_WU=3; ST_IT=15; ST_WU=3
fi

BLOG=$(mktemp /tmp/sy-bench-build.XXXXXX)
if ! { [ -f "$BUILD/CMakeCache.txt" ] || cmake -S "$ROOT" -B "$BUILD"; } >"$BLOG" 2>&1 ||
   ! cmake --build "$BUILD" -j"$(nproc)" --target sy_bench >>"$BLOG" 2>&1; then
    cat "$BLOG" >&2
    echo "bench/run.sh: build failed (in $BUILD)" >&2
    rm -f "$BLOG"
    exit 1
fi
rm -f "$BLOG"
BENCH=$BUILD/bench/sy_bench

PYPI_PY=
if [ "$PYPI" = 1 ]; then
    VENV=${SY_TORCH_VENV:-$BUILD/bench-venv}
    if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
        echo "== installing the current torch from PyPI into $VENV (benchmark only)"
        python3 -m venv "$VENV" && "$VENV/bin/pip" install -q torch numpy ||
            { echo "bench/run.sh: could not install torch from PyPI" >&2; exit 1; }
    fi
    PYPI_PY=$VENV/bin/python
fi

. "$ROOT/bench/families.sh"
export OPENBLAS_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS

TMP=$(mktemp -d /tmp/sy-bench.XXXXXX)
trap 'rm -rf "$TMP"' EXIT

COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$ROOT" diff --quiet HEAD 2>/dev/null || COMMIT="$COMMIT+uncommitted"
echo "== commit $COMMIT; $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "== machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; $THREADS threads"
echo "== SIMD flags: $(for f in sse4_2 avx avx2 fma avx512f avx512bw avx512dq avx512vl avx512_bf16 amx_tile; do has $f && printf '%s ' $f; done)"
echo "== kernel families: ${FAMILIES[*]:-(default detection)}"
LOAD1=$(cut -d' ' -f1 /proc/loadavg)
echo "== load before: $(uptime | sed 's/.*load average/load average/')"
if awk -v l="$LOAD1" 'BEGIN { exit !(l > 0.5) }'; then
    echo "== WARNING: the machine is busy (1-min load $LOAD1): other processes share the cores," \
         "so these timings are inflated and noisy; rerun when idle"
fi

run() { # side, then the command; keeps the RESULT line, echoes the rest
    local side=$1; shift
    "$@" > "$TMP/out" 2>&1 || { cat "$TMP/out" >&2; echo "bench/run.sh: failed: $*" >&2; exit 1; }
    sed 's/^/   /' "$TMP/out" | grep -v '^   RESULT'
    grep '^RESULT' "$TMP/out" | sed "s/^RESULT/$side/" >> "$RES"
}

# Debian's torch runs its own OpenMP pool next to a pthread OpenBLAS pool; with libgomp's
# default (spinning) wait policy the two fight for the cores, which can double torch's times.
# So Debian's torch runs twice: as configured by default and with OMP_WAIT_POLICY=PASSIVE; the
# table compares against the faster of the two (--quick: only the PASSIVE one).
torch_run() {
    if [ "$QUICK" = 0 ]; then
        echo "   [torch, default OpenMP wait policy]"
        run torch env -u OMP_WAIT_POLICY $PY "$ROOT/bench/torch_bench.py" "$@"
    fi
    echo "   [torch, OMP_WAIT_POLICY=PASSIVE]"
    run torchP env OMP_WAIT_POLICY=PASSIVE $PY "$ROOT/bench/torch_bench.py" "$@"
    if [ -n "$PYPI_PY" ]; then
        echo "   [torch from PyPI]"
        run pypi env -u OPENBLAS_CORETYPE "${PYPI_ENV[@]}" "$PYPI_PY" "$ROOT/bench/torch_bench.py" "$@"
    fi
}

for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
for FAM in "${FAMILIES[@]}"; do
    RES=$TMP/results-${FAM:-default}-$ROUND
    : > "$RES"
    if [ -n "$FAM" ]; then export OPENBLAS_CORETYPE=$FAM; else unset OPENBLAS_CORETYPE; fi
    PYPI_ENV=(SY_NOTHING=)
    case "$FAM" in
    Haswell | Zen) PYPI_ENV=(MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2) ;;
    esac
    echo
    echo "######## OpenBLAS kernel family: ${FAM:-(default)}$([ "$ROUNDS" = 1 ] || echo ", round $ROUND of $ROUNDS")"
    echo "== torch (Debian): $($PY "$ROOT/bench/torch_bench.py" info --threads "$THREADS")"
    [ -z "$PYPI_PY" ] || echo "== torch (PyPI): $(env -u OPENBLAS_CORETYPE "${PYPI_ENV[@]}" "$PYPI_PY" "$ROOT/bench/torch_bench.py" info --threads "$THREADS" 2>&1 | tail -1) ${PYPI_ENV[*]}"

    echo "== sgemm 2048^3"
    run sy "$BENCH" sgemm --threads "$THREADS" --iters $SGEMM_IT
    torch_run sgemm --threads "$THREADS" --iters $SGEMM_IT

    echo "== Switch layer fwd+bwd (G=2048 D=512 F=2048 E=8 cf=1.25, fp32, balanced routing)"
    run sy "$BENCH" switch --threads "$THREADS" --iters $SW_IT --warmup $SW_WU --dump "$TMP/switch.bin"
    torch_run switch --threads "$THREADS" --iters $SW_IT --warmup $SW_WU --load "$TMP/switch.bin"

    echo "== Switch layer fwd+bwd, skewed routing (--skew 0.7)"
    run sy "$BENCH" switch --skew 0.7 --threads "$THREADS" --iters $SW_IT --warmup $SW_WU --dump "$TMP/skew.bin"
    torch_run switch --name switch_skew --threads "$THREADS" --iters $SW_IT --warmup $SW_WU --load "$TMP/skew.bin"

    echo "== tiny model train step (configs/tiny.yaml, fp32)"
    run sy "$BENCH" step --threads "$THREADS" --iters $ST_IT --warmup $ST_WU \
        --config "$ROOT/configs/tiny.yaml" --dump "$TMP/step"
    torch_run step --threads "$THREADS" --iters $ST_IT --warmup $ST_WU --load "$TMP/step"
    echo "== load after: $(uptime | sed 's/.*load average/load average/')"

    echo
    echo "## ${FAM:-default} kernels ($(lscpu | sed -n 's/^Model name: *//p'), $THREADS threads, commit $COMMIT)"
    $PY "$ROOT/bench/run_tables.py" table "$RES"
done
done

[ "$ROUNDS" -gt 1 ] || exit 0
for FAM in "${FAMILIES[@]}"; do
    echo
    echo "## ${FAM:-default} kernels over $ROUNDS rounds ($(lscpu | sed -n 's/^Model name: *//p'), $THREADS threads, commit $COMMIT)"
    $PY "$ROOT/bench/run_tables.py" summary "$TMP/results-${FAM:-default}" "$ROUNDS"
done

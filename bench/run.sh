#!/usr/bin/env bash
# switchyard vs PyTorch on this CPU, in one command (see docs/performance.md).
#
#   bench/run.sh [--quick] [--threads N] [--build DIR]
#
# Builds bench/sy_bench if needed (in DIR, default ./build, the project's default build type),
# then runs, one process at a time (never concurrently):
#   sgemm   cblas_sgemm 2048^3 (switchyard's OpenBLAS) and torch.mm 2048^3
#   switch  one Switch layer fwd+bwd: G=2048 tokens, D=512, F=2048, E=8, capacity factor 1.25
#   step    one optimizer step of configs/tiny.yaml (2 micro-batches of 8x128 tokens)
# The C side writes its inputs (Switch inputs and weights; the initial tiny model, its config
# and the tokens) and the PyTorch side loads them, so both do the same routing load.
# Both processes get the same OpenBLAS kernel choice (OPENBLAS_CORETYPE=SkylakeX on CPUs with
# avx512f) and the same thread count.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=$ROOT/build
THREADS=2
QUICK=0
PY=/usr/bin/python3
while [ $# -gt 0 ]; do
    case "$1" in
    --quick) QUICK=1 ;;
    --threads) THREADS=$2; shift ;;
    --build) BUILD=$2; shift ;;
    -h | --help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench/run.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

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

if grep -qw avx512f /proc/cpuinfo; then
    export OPENBLAS_CORETYPE=SkylakeX
fi
export OPENBLAS_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS

TMP=$(mktemp -d /tmp/sy-bench.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
RES=$TMP/results

echo "== machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; $THREADS threads;" \
     "OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-(unset)}"
LOAD1=$(cut -d' ' -f1 /proc/loadavg)
echo "== load before: $(uptime | sed 's/.*load average/load average/')"
if awk -v l="$LOAD1" 'BEGIN { exit !(l > 0.5) }'; then
    echo "== WARNING: the machine is busy (1-min load $LOAD1): other processes share the cores," \
         "so these timings are inflated and noisy; rerun when idle"
fi
echo "== torch: $($PY "$ROOT/bench/torch_bench.py" info --threads "$THREADS")"

run() { # side, then the command; keeps the RESULT line, echoes the rest
    local side=$1; shift
    "$@" > "$TMP/out" 2>&1 || { cat "$TMP/out" >&2; echo "bench/run.sh: failed: $*" >&2; exit 1; }
    sed 's/^/   /' "$TMP/out" | grep -v '^   RESULT'
    grep '^RESULT' "$TMP/out" | sed "s/^RESULT/$side/" >> "$RES"
}

# Debian's torch runs its own OpenMP pool next to a pthread OpenBLAS pool; with libgomp's
# default (spinning) wait policy the two fight for the 2 cores, which can double torch's times.
# So torch runs twice: as configured by default (torch.set_num_threads only) and with
# OMP_WAIT_POLICY=PASSIVE; the table compares against the faster of the two (--quick: only
# the PASSIVE one).
torch_run() {
    if [ "$QUICK" = 0 ]; then
        echo "   [torch, default OpenMP wait policy]"
        run torch env -u OMP_WAIT_POLICY $PY "$ROOT/bench/torch_bench.py" "$@"
    fi
    echo "   [torch, OMP_WAIT_POLICY=PASSIVE]"
    run torchP env OMP_WAIT_POLICY=PASSIVE $PY "$ROOT/bench/torch_bench.py" "$@"
}

echo "== sgemm 2048^3"
run sy "$BENCH" sgemm --threads "$THREADS" --iters $SGEMM_IT
torch_run sgemm --threads "$THREADS" --iters $SGEMM_IT

echo "== Switch layer fwd+bwd (G=2048 D=512 F=2048 E=8 cf=1.25, fp32)"
run sy "$BENCH" switch --threads "$THREADS" --iters $SW_IT --warmup $SW_WU --dump "$TMP/switch.bin"
torch_run switch --threads "$THREADS" --iters $SW_IT --warmup $SW_WU --load "$TMP/switch.bin"

echo "== tiny model train step (configs/tiny.yaml, fp32)"
run sy "$BENCH" step --threads "$THREADS" --iters $ST_IT --warmup $ST_WU \
    --config "$ROOT/configs/tiny.yaml" --dump "$TMP/step"
torch_run step --threads "$THREADS" --iters $ST_IT --warmup $ST_WU --load "$TMP/step"

echo "== load after: $(uptime | sed 's/.*load average/load average/')"
echo
$PY - "$RES" <<'EOF'
import sys
rows = {}
for line in open(sys.argv[1]):
    side, *kv = line.split()
    d = dict(x.split("=", 1) for x in kv)
    rows.setdefault(d["name"], {})[side] = d
cfgname = {"torch": "default OpenMP wait", "torchP": "OMP_WAIT_POLICY=PASSIVE"}
for n, r in rows.items():  # "torch" below = the faster torch configuration
    tor = [k for k in ("torch", "torchP") if k in r]
    print(f"torch {n}: " + ", ".join(f"{cfgname[k]} {float(r[k]['ms']):.2f} ms" for k in tor))
    r["torch"] = min((r[k] for k in tor), key=lambda d: float(d["ms"]))
print()
sg = float(rows["sgemm"]["sy"]["gflops"])
names = {"sgemm": "sgemm 2048^3", "switch": "Switch layer fwd+bwd", "step": "tiny train step"}
print(f"{'name':<22} | {'switchyard ms':>13} | {'torch ms':>9} | {'ratio':>6} | "
      f"{'switchyard GFLOP/s':>18} | {'% of sgemm':>10}")
print("-" * 94)
for n in ("sgemm", "switch", "step"):
    s, t = rows[n]["sy"], rows[n]["torch"]
    sms, tms = float(s["ms"]), float(t["ms"])
    gf = s.get("gflops")
    gfs = f"{float(gf):18.1f}" if gf else f"{'-':>18}"
    pct = f"{100 * float(gf) / sg:9.1f}%" if gf else f"{'-':>10}"
    print(f"{names[n]:<22} | {sms:13.2f} | {tms:9.2f} | {tms / sms:6.2f} | {gfs} | {pct}")
print()
print("ratio = torch ms / switchyard ms (> 1: switchyard faster); ms are medians; torch ms is\n"
      "the faster of its two OpenMP wait policies")
print("min ms (best iteration): " + ", ".join(
    f"{names[n]} {float(rows[n]['sy']['min_ms']):.2f} / {float(rows[n]['torch']['min_ms']):.2f}"
    for n in ("sgemm", "switch", "step")) + "  (switchyard / torch)")
sw = rows["switch"]
print(f"Switch routing: kept {sw['sy']['kept']}/{sw['sy']['G']} (switchyard) vs "
      f"{sw['torch']['kept']}/{sw['torch']['G']} (torch), capacity {sw['sy']['capacity']}; "
      f"aux {float(sw['sy']['aux']):.4f}/{float(sw['torch']['aux']):.4f}, "
      f"sum(out*dout) {float(sw['sy']['obj']):.5e}/{float(sw['torch']['obj']):.5e}")
print(f"Switch fwd/bwd ms: switchyard {float(sw['sy']['fwd_ms']):.2f}/{float(sw['sy']['bwd_ms']):.2f},"
      f" torch {float(sw['torch']['fwd_ms']):.2f}/{float(sw['torch']['bwd_ms']):.2f}")
st = rows["step"]
print(f"Step: tokens/s switchyard {float(st['sy']['tokens_per_s']):.0f}, torch "
      f"{float(st['torch']['tokens_per_s']):.0f}; loss {float(st['sy']['loss0']):.4f}->"
      f"{float(st['sy']['loss_last']):.4f} vs {float(st['torch']['loss0']):.4f}->"
      f"{float(st['torch']['loss_last']):.4f} over {st['sy']['steps']} steps; dropped "
      f"{100 * float(st['sy']['dropped_frac']):.2f}% vs {100 * float(st['torch']['dropped_frac']):.2f}%")
print(f"sgemm: torch.mm reaches {float(rows['sgemm']['torch']['gflops']):.1f} GFLOP/s "
      f"(its own OpenBLAS build, see the torch line above)")
EOF

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
    $PY - "$RES" <<'EOF'
import sys
rows = {}
for line in open(sys.argv[1]):
    side, *kv = line.split()
    d = dict(x.split("=", 1) for x in kv)
    rows.setdefault(d["name"], {})[side] = d
for n, r in rows.items():  # "torch" below = the faster Debian torch configuration
    tor = [k for k in ("torch", "torchP") if k in r]
    r["torch"] = min((r[k] for k in tor), key=lambda d: float(d["ms"]))
pypi = all("pypi" in r for r in rows.values())
sg = float(rows["sgemm"]["sy"]["gflops"])
names = {"sgemm": "sgemm 2048^3", "switch": "Switch fwd+bwd", "switch_fwd": "...forward alone",
         "switch_skew": "Switch fwd+bwd, skewed", "skew_fwd": "...forward alone",
         "step": "tiny train step"}
hdr = f"| {'case':<24} | {'switchyard ms':>13} | {'torch ms':>9} | {'ratio':>6} |"
if pypi:
    hdr += f" {'PyPI torch ms':>13} | {'ratio':>6} |"
hdr += f" {'GFLOP/s':>8} | {'% of sgemm':>10} |"
print(hdr)
print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
def line(label, s_ms, t_ms, p_ms, gf):
    out = f"| {label:<24} | {s_ms:13.2f} | {t_ms:9.2f} | {t_ms / s_ms:6.2f} |"
    if pypi:
        out += f" {p_ms:13.2f} | {p_ms / s_ms:6.2f} |"
    gfs = f"{gf:8.1f}" if gf else f"{'-':>8}"
    pct = f"{100 * gf / sg:9.1f}%" if gf else f"{'-':>10}"
    print(out + f" {gfs} | {pct} |")
for n in ("sgemm", "switch", "switch_skew", "step"):
    s, t = rows[n]["sy"], rows[n]["torch"]
    p = rows[n].get("pypi", {})
    if n == "sgemm":
        line("sgemm 2048^3 (OpenBLAS)", float(s["ms"]), float(t["ms"]), float(p.get("ms", "nan")), float(s["gflops"]))
        line("sgemm via sy_sgemm tiles", float(s["tiled_ms"]), float(t["ms"]), float(p.get("ms", "nan")), float(s["tiled_gflops"]))
        continue
    line(names[n], float(s["ms"]), float(t["ms"]), float(p.get("ms", "nan")), float(s["gflops"]) if "gflops" in s else None)
    if n.startswith("switch"):
        line("...forward alone", float(s["fwd_ms"]), float(t["fwd_ms"]), float(p.get("fwd_ms", "nan")), None)
print()
print("ratio = torch ms / switchyard ms (> 1: switchyard faster); medians; Debian torch ms is the\n"
      "faster of its two OpenMP wait policies" + ("; PyPI torch: its own MKL/oneDNN" if pypi else ""))
for n in ("switch", "switch_skew"):
    sw = rows[n]
    print(f"{names[n]}: kept {sw['sy']['kept']}/{sw['sy']['G']} (switchyard) vs "
          f"{sw['torch']['kept']}/{sw['torch']['G']} (torch), capacity {sw['sy']['capacity']}; "
          f"aux {float(sw['sy']['aux']):.4f}/{float(sw['torch']['aux']):.4f}; "
          f"fwd/bwd ms {float(sw['sy']['fwd_ms']):.2f}/{float(sw['sy']['bwd_ms']):.2f} vs "
          f"{float(sw['torch']['fwd_ms']):.2f}/{float(sw['torch']['bwd_ms']):.2f}")
st = rows["step"]
print(f"Step: tokens/s switchyard {float(st['sy']['tokens_per_s']):.0f}, torch "
      f"{float(st['torch']['tokens_per_s']):.0f}; loss {float(st['sy']['loss0']):.4f}->"
      f"{float(st['sy']['loss_last']):.4f} vs {float(st['torch']['loss0']):.4f}->"
      f"{float(st['torch']['loss_last']):.4f}")
EOF
done
done

[ "$ROUNDS" -gt 1 ] || exit 0
for FAM in "${FAMILIES[@]}"; do
    echo
    echo "## ${FAM:-default} kernels over $ROUNDS rounds ($(lscpu | sed -n 's/^Model name: *//p'), $THREADS threads, commit $COMMIT)"
    $PY - "$TMP/results-${FAM:-default}" "$ROUNDS" <<'EOF'
import statistics, sys
base, rounds = sys.argv[1], int(sys.argv[2])
def load(path):
    rows = {}
    for line in open(path):
        side, *kv = line.split()
        d = dict(x.split("=", 1) for x in kv)
        rows.setdefault(d["name"], {})[side] = d
    for r in rows.values():  # Debian torch: the faster of its two OpenMP wait policies
        tor = [k for k in ("torch", "torchP") if k in r]
        r["torch"] = min((r[k] for k in tor), key=lambda d: float(d["ms"]))
    return rows
R = [load(f"{base}-{i}") for i in range(1, rounds + 1)]
pypi = all("pypi" in r for rows in R for r in rows.values())
# (label, case, field, reference, target): issue 8's targets
checks = [("Switch fwd+bwd / Debian torch", "switch", "ms", "torch", 1.5),
          ("...forward alone / Debian torch", "switch", "fwd_ms", "torch", 1.3),
          ("Switch skewed / Debian torch", "switch_skew", "ms", "torch", 1.5),
          ("...forward alone / Debian torch", "switch_skew", "fwd_ms", "torch", 1.3),
          ("tiny train step / Debian torch", "step", "ms", "torch", 1.5)]
if pypi:
    checks += [("Switch fwd+bwd / PyPI torch", "switch", "ms", "pypi", 1.0),
               ("Switch skewed / PyPI torch", "switch_skew", "ms", "pypi", 1.0),
               ("tiny train step / PyPI torch", "step", "ms", "pypi", 1.0)]
hdr = f"| {'case':<34} | {'target':>6} | {'median':>6} | {'range':>11} | {'rounds meeting':>14} |"
print(hdr)
print("|" + "|".join("-" * len(c) for c in hdr.split("|")[1:-1]) + "|")
def row(label, vals, target, pct=False):
    med = statistics.median(vals)
    meet = sum(v >= target for v in vals)
    f = (lambda v: f"{v:.1f}") if pct else (lambda v: f"{v:.2f}")
    rng = f"{f(min(vals))}-{f(max(vals))}"
    print(f"| {label:<34} | {f(target):>6} | {f(med):>6} | {rng:>11} | {meet:>7} of {len(vals):<3} |")
for label, case, field, ref, target in checks:
    row(label, [float(r[case][ref][field]) / float(r[case]["sy"][field]) for r in R], target)
row("Switch fwd+bwd, % of sgemm", [100 * float(r["switch"]["sy"]["gflops"]) / float(r["sgemm"]["sy"]["gflops"]) for r in R], 75.0, True)
row("Switch skewed, % of sgemm", [100 * float(r["switch_skew"]["sy"]["gflops"]) / float(r["sgemm"]["sy"]["gflops"]) for r in R], 75.0, True)
print()
print("ratio = torch ms / switchyard ms, both sides of one round (measured minutes apart, one\n"
      "process at a time); switchyard Switch fwd+bwd ms by round: " +
      ", ".join(f"{float(r['switch']['sy']['ms']):.1f}" for r in R) +
      "; Debian torch: " + ", ".join(f"{float(r['switch']['torch']['ms']):.1f}" for r in R))
EOF
done

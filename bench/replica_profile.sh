#!/usr/bin/env bash
# Where the peer replicas' CPU goes (issue 18): `perf record -a` over the steady state of a
# `switchyard run` of configs/tiny.yaml (3 workers x 1 thread, any --set) without replicas and
# with them (cluster.replicas=1, the overlapped exchange in the background), one after the other;
# then, for each thread group and library, the CPU milliseconds a step in each run and the
# difference. Thread groups: "training" (the workers' own threads: the training thread, its
# OpenMP threads, the replica thread), "1/ZMQbg" (each worker's training data plane: its ZeroMQ
# I/O thread, where CurveZMQ seals and opens), "2/ZMQbg" (the replica data plane), "idle" (the
# kernel's idle task: CPU time nobody used), "other".
#
#   bench/replica_profile.sh [--build DIR] [--steps N] [--seconds S] [--set KEY=VALUE ...]
#
# Defaults: build/, 200 steps, 15 s of samples from the 6th second on (the run must last longer:
# raise --steps for bigger states). Needs linux-perf (apt-get install linux-perf) and root (or
# perf_event_paranoid <= 0) for -a. Per step = samples / frequency over the window, times the
# run's mean step / the window.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=$ROOT/build
STEPS=200
SECONDS_=15
SETS=()
while [ $# -gt 0 ]; do
    case "$1" in
    --build) BUILD=$2; shift ;;
    --steps) STEPS=$2; shift ;;
    --seconds) SECONDS_=$2; shift ;;
    --set) SETS+=(--set "$2"); shift ;;
    -h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench/replica_profile.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
command -v perf >/dev/null || { echo "bench/replica_profile.sh: perf not found (apt-get install linux-perf)" >&2; exit 1; }
[[ "$STEPS" =~ ^[1-9][0-9]*$ && "$SECONDS_" =~ ^[1-9][0-9]*$ ]] ||
    { echo "bench/replica_profile.sh: --steps and --seconds take positive integers" >&2; exit 2; }
TMP=$(mktemp -d /tmp/sy-repprof.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
FREQ=499
/usr/bin/python3 - "$TMP/text" <<'EOF'
import os, random, sys
os.makedirs(sys.argv[1])
rnd = random.Random(11)
words = ["mixture", "of", "experts", "routes", "each", "token", "to", "one", "feed", "forward"]
with open(os.path.join(sys.argv[1], "c.txt"), "w") as f:
    for _ in range(6000):
        f.write(" ".join(rnd.choice(words) for _ in range(rnd.randint(4, 14))) + ".\n")
EOF
"$BUILD/switchyard" data prepare --input "$TMP/text" --out "$TMP/data" >/dev/null
SRC=$(sed -n 's/^CMAKE_HOME_DIRECTORY:INTERNAL=//p' "$BUILD/CMakeCache.txt" 2>/dev/null || true)
echo "$BUILD: commit $(git -C "${SRC:-$ROOT}" rev-parse --short HEAD 2>/dev/null || echo unknown); $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs; ${SETS[*]:-tiny}"
for REP in 0 1; do
    "$BUILD/switchyard" run "$ROOT/configs/tiny.yaml" --workers 3 --quiet --set "data.train=$TMP/data/train_*.bin" \
        --set data.val= --set "run.state_dir=$TMP/state$REP" --set "checkpoint.store=$TMP/store$REP" \
        --set "run.steps=$STEPS" --set checkpoint.every=0 --set train.threads=1 --set run.log_every=100000 \
        "${SETS[@]}" --set "cluster.replicas=$REP" &
    PID=$!
    sleep 6
    perf record -q -a -F $FREQ -o "$TMP/perf$REP.data" -- sleep "$SECONDS_" >/dev/null 2>&1
    kill -0 $PID 2>/dev/null || { echo "bench/replica_profile.sh: the run ended before the samples did (raise --steps)" >&2; exit 1; }
    wait $PID
    perf report -i "$TMP/perf$REP.data" --sort comm,dso -n --stdio 2>/dev/null | grep -E '^ +[0-9]' > "$TMP/table$REP"
done
/usr/bin/python3 - "$TMP" "$FREQ" "$SECONDS_" <<'EOF'
import collections, json, re, statistics, sys
tmp, freq, window = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])

def group(comm):
    if comm.startswith("switchyard-work"): return "training"
    if comm == "swapper": return "idle"
    m = re.match(r"(\d+)/ZMQbg", comm)
    return f"{m.group(1)}/ZMQbg" if m else "other"

res = []
for rep in (0, 1):
    steps = {}
    for line in open(f"{tmp}/state{rep}/metrics.jsonl"):
        m = json.loads(line)
        if "step_ms" in m: steps[m["step"]] = m["step_ms"]
    step_ms = statistics.mean(v for k, v in steps.items() if k > 1)
    per = collections.Counter()
    for line in open(f"{tmp}/table{rep}"):
        f = line.split()
        # "  12.34%  567  comm words...  dso"
        n, comm, dso = int(f[1]), " ".join(f[2:-1]), f[-1]
        dso = "kernel" if dso.startswith("[kernel") else re.sub(r"\.so.*$", "", dso)
        per[(group(comm), dso)] += n / freq * 1e3 * step_ms / (window * 1e3)
    res.append((step_ms, per))
(s0, a), (s1, b) = res
print(f"mean step: no replicas {s0:.1f} ms, replicas {s1:.1f} ms ({s1 / s0:.3f})")
print(f"{'thread group':12s} {'library':26s} {'no replicas':>12s} {'replicas':>10s} {'difference':>11s}  (CPU ms a step)")
keys = sorted(set(a) | set(b), key=lambda k: -(abs(b[k] - a[k])))
for k in keys:
    if max(a[k], b[k]) < 0.5: continue
    print(f"{k[0]:12s} {k[1]:26s} {a[k]:12.1f} {b[k]:10.1f} {b[k] - a[k]:+11.1f}")
tot = lambda c: sum(v for k, v in c.items() if k[0] != "idle")
print(f"{'all but idle':39s} {tot(a):12.1f} {tot(b):10.1f} {tot(b) - tot(a):+11.1f}")
EOF

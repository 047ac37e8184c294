#!/usr/bin/env bash
# Checkpoint benchmark (file store): save and load throughput of the tiny model's state and of a
# >= 500 MB state, against plain `cp` (and `cp` + sync, the durable equivalent: the store fsyncs
# every object) of the same bytes, measured in the same run, interleaved, best of REPS; and the
# training stall of an asynchronous save as a fraction of the step time (metrics.jsonl of a tiny
# run with checkpoint.every=5).
#
# usage: bench/ckpt_bench.sh [BUILD_DIR] [REPS]     (default: build, 3)
# Prints a Markdown table (the rows of docs/performance.md "## Checkpoints (file store)").
# Needs /usr/bin/python3 for the arithmetic. Uses a temporary folder under ${TMPDIR:-/tmp}.
set -euo pipefail

BUILD=${1:-build}
REPS=${2:-3}
SY="$BUILD/switchyard"
BENCH="$BUILD/bench/ckpt_bench"
SRC=$(cd "$(dirname "$0")/.." && pwd)
PY=/usr/bin/python3
for f in "$SY" "$BENCH"; do
    [ -x "$f" ] || { echo "ckpt_bench.sh: $f not built (cmake --build $BUILD)" >&2; exit 2; }
done
TMP=$(mktemp -d "${TMPDIR:-/tmp}/sy-ckpt-bench-XXXXXX")
trap 'rm -rf "$TMP"' EXIT
export SY_LOG=warn

now() { date +%s.%N; }

# bench NAME SETS...: REPS x (checkpoint save/load + async of a fresh store; cp; cp+sync; cat)
bench() {
    local name=$1
    shift
    local out="$TMP/$name.jsonl"
    : >"$out"
    for r in $(seq 1 "$REPS"); do
        local st="$TMP/store-$name-$r"
        local j
        j=$("$BENCH" --store "$st" --run "$name" --reps 1 "$@")
        # the step folder the bench left (same files, same bytes)
        local src
        src=$(ls -d "$st/$name"/ckpt/step-* | tail -1)
        local bytes
        bytes=$(cat "$src"/*.safetensors | wc -c)
        sync
        local t0 t1 t2 t3 t4
        t0=$(now)
        cp -r "$src" "$TMP/cp-$name-$r"
        t1=$(now)
        rm -rf "$TMP/cp2-$name-$r"
        t2=$(now)
        cp -r "$src" "$TMP/cp2-$name-$r"
        sync "$TMP/cp2-$name-$r"/* "$TMP/cp2-$name-$r" # fsync each file and the folder, as the store does
        t3=$(now)
        cat "$src"/*.safetensors >/dev/null
        t4=$(now)
        $PY - "$j" "$bytes" "$t0" "$t1" "$t2" "$t3" "$t4" >>"$out" <<'EOF'
import json, sys
j = json.loads(sys.argv[1]); b = int(sys.argv[2]); t = [float(x) for x in sys.argv[3:]]
j["bytes_cp"] = b
j["cp_mbps"] = b / (t[1] - t[0]) / 1e6
j["cp_sync_mbps"] = b / (t[3] - t[2]) / 1e6
j["cat_mbps"] = b / (t[4] - t[3]) / 1e6
print(json.dumps(j))
EOF
        rm -rf "$st" "$TMP/cp-$name-$r" "$TMP/cp2-$name-$r"
    done
}

bench tiny
bench big --set model.d_model=512 --set model.d_ff=2048 --set model.n_experts=10 --set model.n_heads=8

# async stall in a real tiny run (the tiny.yaml model), checkpoint every 5 steps
$PY - "$TMP/text" <<'EOF'
import os, random, sys
d = sys.argv[1]; os.makedirs(d, exist_ok=True); r = random.Random(1)
w = ["switch", "expert", "router", "token", "capacity", "the", "a", "of", "loss", "layer", "batch", "shard"]
with open(d + "/c.txt", "w") as f:
    for _ in range(20000):
        f.write(" ".join(r.choice(w) for _ in range(r.randint(3, 12))) + ".\n")
EOF
"$SY" data prepare --input "$TMP/text" --out "$TMP/data" >/dev/null
"$SY" train "$SRC/configs/tiny.yaml" --set "data.train=$TMP/data/train_*.bin" --set run.name=stall \
    --set "run.state_dir=$TMP/state" --set "checkpoint.store=$TMP/stall-store" --set run.steps=41 \
    --set checkpoint.every=5 --set checkpoint.async=true --quiet

$PY - "$TMP/tiny.jsonl" "$TMP/big.jsonl" "$TMP/state/metrics.jsonl" "$REPS" <<'EOF'
import json, statistics, sys
rows = []
for path, label in [(sys.argv[1], "tiny"), (sys.argv[2], ">= 500 MB")]:
    js = [json.loads(l) for l in open(path)]
    best = lambda k: max(j[k] for j in js)
    b = js[0]["state_bytes"]
    save, load, cp, cps, cat = best("save_mbps"), best("load_mbps"), best("cp_mbps"), best("cp_sync_mbps"), best("cat_mbps")
    rows.append(f"| {label} | {b/1e6:.1f} | {save:.0f} | {cps:.0f} | {cp:.0f} | {100*save/cps:.0f} % / {100*save/cp:.0f} % "
                f"| {load:.0f} | {cat:.0f} | {min(j['async_stall_ms'] for j in js):.1f} | {min(j['async_upload_ms'] for j in js):.0f} |")
print(f"Best of {sys.argv[4]} interleaved repetitions (MB/s = 1e6 bytes/s).\n")
print("| state | MB | save MB/s | cp+sync MB/s | cp MB/s | save / cp+sync / cp | load MB/s | cat MB/s | async stall ms | async upload ms |")
print("|---|---|---|---|---|---|---|---|---|---|")
print("\n".join(rows))
m = [json.loads(l) for l in open(sys.argv[3])]
last = m[-1]["step"]
ck = [x for x in m if x["ckpt_stall_ms"] > 0 and x["step"] != last]  # the final save also waits for its upload
step = statistics.median(x["step_ms"] for x in m)
st = [x["ckpt_stall_ms"] for x in ck]
up = [x["ckpt_upload_ms"] for x in m if "ckpt_upload_ms" in x]
print(f"\nAsync stall, tiny run ({len(m)} steps, checkpoint every 5, {len(st)} intermediate checkpoints): "
      f"median step {step:.1f} ms; stall per checkpoint mean {statistics.mean(st):.2f} ms, max {max(st):.2f} ms "
      f"= {100*statistics.mean(st)/step:.2f} % (max {100*max(st)/step:.2f} %) of a step; "
      f"background upload median {statistics.median(up):.0f} ms.")
EOF

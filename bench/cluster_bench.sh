#!/usr/bin/env bash
# Step time of the tiny model on a local cluster of 1, 2 and 4 workers (and the single-process
# trainer as the reference), in one run. Median step_ms over the steps after a warm-up, from the
# coordinator's metrics.jsonl.
# Usage: bench/cluster_bench.sh [BUILD_DIR] [STEPS]
set -euo pipefail
BUILD=${1:-build}
STEPS=${2:-40}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SY=$BUILD/switchyard
TMP=$(mktemp -d /tmp/sy-cluster-bench.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
if [ ! -f "$ROOT/data/fortunes/train_000000.bin" ]; then
  "$SY" data prepare --input /usr/share/games/fortunes --out "$TMP/data" >/dev/null 2>&1
  DATA="$TMP/data/train_*.bin"
else
  DATA="$ROOT/data/fortunes/train_*.bin"
fi
common=(--set "data.train=$DATA" --set "run.steps=$STEPS" --set checkpoint.every=0 --set "checkpoint.store=$TMP/store")
row() {  # row NAME METRICS: median step ms and tokens/s
  /usr/bin/python3 - "$1" "$2" <<'PY'
import json, statistics, sys
lines = [json.loads(l) for l in open(sys.argv[2])]
lines = lines[5:] if len(lines) > 10 else lines
ms = statistics.median(m["step_ms"] for m in lines)
tps = statistics.median(m["tokens_per_s"] for m in lines)
print(f"{sys.argv[1]:<30} {ms:12.1f} {tps:12.0f}")
PY
}
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)   cores: $(nproc)"
printf "%-30s %12s %12s\n" "configuration" "step ms" "tokens/s"
"$SY" train "$ROOT/configs/tiny.yaml" "${common[@]}" --set run.name=b1 --set "run.state_dir=$TMP/s-train" --quiet 2>/dev/null
row "train (1 process, 2 threads)" "$TMP/s-train/metrics.jsonl"
for w in 1 2 4; do
  "$SY" run "$ROOT/configs/tiny.yaml" --workers $w "${common[@]}" --set run.name=bw$w --set "run.state_dir=$TMP/s-w$w" --quiet 2>/dev/null
  row "run --workers $w ($(( $(nproc) / w > 0 ? $(nproc) / w : 1 )) thread(s) each)" "$TMP/s-w$w/metrics.jsonl"
done

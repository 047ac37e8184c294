#!/usr/bin/env bash
# Bytes the expert-parallel all-to-alls move, fp32 vs bf16 (system spec §4: only bf16 rows cross
# the all-to-all in bf16 mode). Runs the tiny model on a local cluster of W workers, once with
# train.precision=fp32 and once with bf16, and sums over the workers what each logged when its
# generation closed: expert-exchange row bytes and counts/token bytes (switch_ep's counters),
# and all the data plane's bytes (sy_comm_stats bytes_sent, which includes the fp64 all-reduce
# of the dense gradients, the same in both modes).
# Usage: bench/ep_bytes.sh [BUILD_DIR] [WORKERS] [STEPS]
set -euo pipefail
BUILD=${1:-build}
W=${2:-3}
STEPS=${3:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SY=$BUILD/switchyard
TMP=$(mktemp -d /tmp/sy-ep-bytes.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
if [ ! -f "$ROOT/data/fortunes/train_000000.bin" ]; then
  "$SY" data prepare --input /usr/share/games/fortunes --out "$TMP/data" >/dev/null 2>&1
  DATA="$TMP/data/train_*.bin"
else
  DATA="$ROOT/data/fortunes/train_*.bin"
fi
printf "%-10s %8s %8s %16s %16s %16s\n" precision workers steps "row bytes" "counts+tokens" "data plane total"
for p in fp32 bf16; do
  "$SY" run "$ROOT/configs/tiny.yaml" --workers "$W" --set "data.train=$DATA" --set "run.steps=$STEPS" \
    --set checkpoint.every=0 --set "checkpoint.store=$TMP/store-$p" --set run.name=b$p \
    --set "run.state_dir=$TMP/s-$p" --set train.precision=$p --quiet 2>/dev/null
  cat "$TMP/s-$p"/logs/worker-*.log | /usr/bin/python3 -c '
import re, sys
rows = meta = total = 0
for line in sys.stdin:
    m = re.search(r"data plane sent (\d+) bytes .* expert exchange (\d+) bytes of rows \(\w+\), (\d+) of counts", line)
    if m:
        total += int(m.group(1)); rows += int(m.group(2)); meta += int(m.group(3))
print(f"{sys.argv[1]:<10} {sys.argv[2]:>8} {sys.argv[3]:>8} {rows:16d} {meta:16d} {total:16d}")
' "$p" "$W" "$STEPS"
done

#!/usr/bin/env bash
# Memory and start-up cost of the two data orders (data.order, model spec §6) at a corpus of
# N windows: one local shard of N+1 random tokens read with seq_len 1 (every token starts a
# window), then tests/sy_dataorder prints 3 steps of 4 x 8 samples in each order. Reports peak
# RSS and wall time of each (GNU time), side by side.
#   bench/data_order_bench.sh [N (default 50000000)] [BUILD_DIR (default build)]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-50000000}
BUILD=${2:-build}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
/usr/bin/python3 - "$tmp/big.bin" "$N" <<'PY'
import struct, sys
import numpy as np
path, n = sys.argv[1], int(sys.argv[2]) + 1
hdr = [0] * 256
hdr[0], hdr[1], hdr[2] = 20240520, 1, n
with open(path, "wb") as f:
    f.write(struct.pack("<256i", *hdr))
    f.write(np.random.default_rng(1).integers(0, 256, n, dtype=np.uint16).tobytes())
PY
echo "N = $N windows"
echo "| order | peak RSS MiB | wall s |"
echo "|---|---|---|"
for o in feistel fisher-yates; do
  /usr/bin/time -f "%M %e" -o "$tmp/t" "$BUILD/tests/sy_dataorder" --order "$o" 7 1 4 8 3 "$tmp/big.bin" >/dev/null
  read -r kb s <"$tmp/t"
  echo "| $o | $((kb / 1024)) | $s |"
done

#!/bin/sh
# All-to-all throughput of the tcp data plane (src/comm/comm_tcp.c) against raw ZeroMQ PUSH/PULL
# transfers of the same bytes on loopback, and the same all-to-all with CurveZMQ, with 2 and 4
# processes, in one run. Prints a Markdown
# table (the one in docs/performance.md, "Data plane (tcp)").
#
#   bench/comm_bench.sh [BUILD_DIR]      (default: $SY_BUILD or ./build)
#   env: MB (MiB moved per all-to-all, default 64), ITERS (timed iterations, default 10),
#        PROCS (default "2 4")
set -eu
BUILD=${1:-${SY_BUILD:-build}}
MB=${MB:-64}
ITERS=${ITERS:-10}
PROCS=${PROCS:-"2 4"}
TOOL=$BUILD/tests/sy_commbench
if [ ! -x "$TOOL" ]; then
    echo "comm_bench: $TOOL is not built (cmake --build $BUILD --target sy_commbench)" >&2
    exit 1
fi
echo "| processes | MiB moved per all-to-all | tcp data plane GB/s | raw zmq_send GB/s | raw zero-copy GB/s | tcp / raw zmq_send | tcp / raw zero-copy | CURVE data plane GB/s | CURVE / tcp |"
echo "|---|---|---|---|---|---|---|---|---|"
for W in $PROCS; do
    out=$("$TOOL" --procs "$W" --mb "$MB" --iters "$ITERS")
    echo "$out" | grep -v '^RESULT' >&2
    echo "$out" | awk '/^RESULT/ {
        for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        printf "| %s | %s | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f |\n", v["procs"], v["mb"], v["tcp_gbs"],
               v["raw_gbs"], v["raw_zc_gbs"], v["ratio"], v["ratio_zc"], v["curve_gbs"], v["curve_ratio"] }'
done

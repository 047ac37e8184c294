#!/bin/sh
# Runs every fuzz harness built by build.sh, one after the other, for SECONDS each (default 120;
# 0: only re-minimise the corpus):
#   tests/fuzz/run.sh [SECONDS] [BUILD_DIR] [TARGET...]
# New inputs go to a scratch corpus; afterwards the committed corpus tests/fuzz/corpus/<target>/
# is re-minimised with -set_cover_merge=1 (only inputs that add edge coverage are kept).
# Crashes are left as BUILD_DIR/fuzz/crash-<target>-*: fix them, then copy each input into the
# target's corpus so that ctest's fuzz_replay_<target> keeps it.
set -eu
SECS=${1:-120}
SRC=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=${2:-$SRC/build}
BIN=$BUILD/fuzz/bin
shift 2 2>/dev/null || shift $#
TARGETS=${*:-$(cd "$BIN" && ls fuzz_* | sed 's/^fuzz_//')}
rc=0
for t in $TARGETS; do
  corpus=$SRC/tests/fuzz/corpus/$t
  scratch=$BUILD/fuzz/scratch/$t
  mkdir -p "$corpus" "$scratch"
  echo "== fuzz_$t: ${SECS}s"
  if [ "$SECS" -gt 0 ] && ! "$BIN/fuzz_$t" -max_total_time="$SECS" -rss_limit_mb=2048 -timeout=10 -max_len=65536 \
       -artifact_prefix="$BUILD/fuzz/crash-$t-" -print_final_stats=1 "$scratch" "$corpus"; then
    echo "fuzz_$t: found a crash (see $BUILD/fuzz/crash-$t-*)" >&2
    rc=1
  fi
  # Re-minimise: files with names (seeds, crash regressions) stay as they are; the 40-hex
  # names libFuzzer gives are replaced by a greedy minimal set covering corpus + scratch
  # (-set_cover_merge=1 over edges only: a few dozen files, not one per counter bucket).
  merged=$BUILD/fuzz/merged/$t
  rm -rf "$merged" && mkdir -p "$merged"
  "$BIN/fuzz_$t" -set_cover_merge=1 -use_counters=0 -use_cmp=0 -rss_limit_mb=2048 -timeout=10 "$merged" "$corpus" "$scratch" >/dev/null 2>&1 || true
  if [ -n "$(ls "$merged")" ]; then
    # (if, not &&: under set -e a loop whose last test fails would end the script)
    named=$(for f in "$corpus"/*; do
              if basename "$f" | grep -Evq '^[0-9a-f]{40}$'; then sha1sum < "$f" | cut -c1-40; fi; done)
    for f in "$corpus"/*; do if basename "$f" | grep -Eq '^[0-9a-f]{40}$'; then rm -f "$f"; fi; done
    for f in "$merged"/*; do if ! echo "$named" | grep -q "$(basename "$f")"; then cp "$f" "$corpus/"; fi; done
  fi
  echo "fuzz_$t: corpus $(ls "$corpus" | wc -l) files"
done
exit $rc

#!/bin/sh
# Builds every tests/fuzz/fuzz_*.c as a libFuzzer binary with ASan + UBSan:
#   tests/fuzz/build.sh BUILD_DIR
# BUILD_DIR is a normal cmake build folder (for its generated BUILD_DIR/include/proto/proto/*.pb-c.{c,h});
# the project sources are compiled again with coverage into BUILD_DIR/fuzz/, the harnesses go
# to BUILD_DIR/fuzz/bin/. Needs clang with libFuzzer (clang 14 here) and the project's libraries.
set -eu
[ $# -eq 1 ] || { echo "usage: $0 BUILD_DIR" >&2; exit 2; }
SRC=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=$(cd "$1" && pwd)
PB=$BUILD/include/proto/proto
[ -f "$PB/switchyard.pb-c.c" ] || { echo "$0: no $PB/switchyard.pb-c.c: run cmake --build $BUILD first" >&2; exit 2; }
CC=${CC:-clang}
OUT=$BUILD/fuzz
mkdir -p "$OUT/obj" "$OUT/bin"
BLAS=/usr/lib/x86_64-linux-gnu/openblas-openmp
PKGS="jansson libcyaml libcrypto libzmq libprotobuf-c libcurl libmicrohttpd"
CFLAGS="-std=c11 -g -O1 -fno-omit-frame-pointer -Wall -Wextra -Wno-pass-failed -D_GNU_SOURCE -fopenmp \
 -fsanitize=address,undefined -fno-sanitize-recover=undefined \
 -I$SRC/src -I$BUILD/include/proto \
 -I/usr/include/x86_64-linux-gnu/openblas-openmp $(pkg-config --cflags $PKGS)"
LIBS="$(pkg-config --libs $PKGS) -L$BLAS -Wl,-rpath,$BLAS -lopenblas -lm -lpthread"

# The layers the harnesses reach (base, proto, storage, data), with coverage (fuzzer-no-link).
# The rest (backends, model, worker, coordinator loop) is not needed and not built here.
objs=""
for f in "$SRC"/src/base/*.c "$SRC"/src/proto/*.c "$SRC"/src/storage/*.c "$SRC"/src/data/*.c "$PB"/*.pb-c.c; do
  o="$OUT/obj/$(basename "$(dirname "$f")")_$(basename "$f" .c).o"
  if [ ! -f "$o" ] || [ "$f" -nt "$o" ] || [ "$0" -nt "$o" ] || \
     [ -n "$(find "$SRC/src" -name '*.h' -newer "$o" | head -1)" ]; then
    rm -f "$o"
    $CC $CFLAGS -fsanitize=fuzzer-no-link -c "$f" -o "$o" &
    while [ "$(jobs -r | wc -l)" -ge "${JOBS:-2}" ]; do sleep 0.2; done
  fi
  objs="$objs $o"
done
wait
for o in $objs; do [ -f "$o" ] || { echo "$0: compiling $o failed" >&2; exit 1; }; done
rm -f "$OUT/libsycore_fuzz.a"
ar rcs "$OUT/libsycore_fuzz.a" $objs

for h in "$SRC"/tests/fuzz/fuzz_*.c; do
  name=$(basename "$h" .c)
  $CC $CFLAGS -fsanitize=fuzzer "$h" "$OUT/libsycore_fuzz.a" $LIBS -o "$OUT/bin/$name"
  echo "built $OUT/bin/$name"
done

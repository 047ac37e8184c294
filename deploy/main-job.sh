#!/usr/bin/env bash
# The main job: install and build what is needed, prepare the default corpus (the English text
# of Debian's fortunes package) and train the tiny Switch Transformer on it with a local cluster
# (a coordinator and SY_WORKERS worker processes, default 2, expert-parallel), showing progress.
# Extra arguments go to `switchyard run` (for example: --set run.steps=100). Run again, it
# continues the run from its latest checkpoint (--resume; a finished run is a no-op); pass
# --overwrite to start afresh (the old run is moved aside in the checkpoint store).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/build.sh
if [ ! -f data/fortunes/train_000000.bin ]; then
  ./build/switchyard data prepare --input /usr/share/games/fortunes --out data/fortunes
fi
mode=(--resume)
for a in "$@"; do [ "$a" = --overwrite ] && mode=(); done
exec ./build/switchyard run configs/tiny.yaml --workers "${SY_WORKERS:-2}" "${mode[@]}" "$@"

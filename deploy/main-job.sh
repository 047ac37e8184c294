#!/usr/bin/env bash
# The main job: install and build what is needed, prepare the default corpus (the English text
# of Debian's fortunes package) and train the tiny Switch Transformer on it with a local cluster
# (a coordinator and SY_WORKERS worker processes, default 2, expert-parallel), showing progress.
# Extra arguments go to `switchyard run` (for example: --set run.steps=100). Run again, it
# continues the run from its latest checkpoint (--resume; a finished run is a no-op); pass
# --overwrite to start afresh (the old run is moved aside in the checkpoint store). It ends by
# printing a sample of what the model writes (`switchyard sample` from the latest checkpoint;
# SY_PROMPT sets the prompt).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/build.sh
if [ ! -f data/fortunes/train_000000.bin ]; then
  ./build/switchyard data prepare --input /usr/share/games/fortunes --out data/fortunes
fi
mode=(--resume)
for a in "$@"; do [ "$a" = --overwrite ] && mode=(); done
./build/switchyard run configs/tiny.yaml --workers "${SY_WORKERS:-2}" "${mode[@]}" "$@"

# the run's checkpoint folder (checkpoint.store/run.name, --set overrides included)
sets=()
prev=""
for a in "$@"; do
  [ "$prev" = --set ] && sets+=(--set "$a")
  case "$a" in --set=*) sets+=(--set "${a#--set=}") ;; esac
  prev="$a"
done
run_dir=$(./build/switchyard config show configs/tiny.yaml "${sets[@]}" |
  python3 -c 'import json, sys; c = json.load(sys.stdin); print(c["checkpoint"]["store"].rstrip("/") + "/" + c["run"]["name"])')
echo
echo "--- a sample from ${run_dir} (switchyard sample --temperature 0.8 --top-k 40 --seed 1):"
./build/switchyard sample --checkpoint "$run_dir" --prompt "${SY_PROMPT:-The }" --length 300 \
  --temperature 0.8 --top-k 40 --seed 1

#!/usr/bin/env bash
# Runs every test: installs what is missing, builds, and runs ctest (C unit tests, PyTorch
# reference tests, end-to-end tests with real processes). Extra arguments go to ctest
# (for example: -R reference). The suite runs twice: as built, then on the poisoned-handle
# backend (SY_BACKEND_POISON=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/build.sh
cd build
# serial: the end-to-end tests start real clusters and time recoveries; on 2 cores, running
# them side by side only makes their timing checks race each other
ctest --output-on-failure --timeout 900 "$@"
# Then the whole suite again on the poisoned-handle backend (docs/architecture.md "Device-ready
# interfaces"): its buffers fault on any host access, so a test passes only if no code outside
# the backend reads or writes backend memory. SY_TEST_NO_POISON=1 skips this second pass.
if [ "${SY_TEST_NO_POISON:-0}" != 1 ]; then
  echo "== the same tests with SY_BACKEND_POISON=1"
  SY_BACKEND_POISON=1 ctest --output-on-failure --timeout 900 "$@"
fi

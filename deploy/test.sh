#!/usr/bin/env bash
# Runs every test: installs what is missing, builds, and runs ctest (C unit tests, PyTorch
# reference tests, end-to-end tests with real processes). Extra arguments go to ctest
# (for example: -R reference).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/build.sh
cd build
# serial: the end-to-end tests start real clusters and time recoveries; on 2 cores, running
# them side by side only makes their timing checks race each other
ctest --output-on-failure --timeout 900 "$@"

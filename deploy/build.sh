#!/usr/bin/env bash
# Installs what is missing and builds switchyard into build/ (Release-like, with debug info).
# Usage: deploy/build.sh   (idempotent; re-running only rebuilds what changed)
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh --quiet
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc)"

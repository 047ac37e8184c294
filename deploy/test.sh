#!/usr/bin/env bash
# Runs every test: installs what is missing, builds, and runs ctest (C unit tests, PyTorch
# reference tests, end-to-end tests with real processes). Extra arguments go to ctest
# (for example: -R reference). The tests that create a compute backend run a second time on the
# poisoned-handle backend (SY_BACKEND_POISON=1); the C unit tests and the fuzz corpus replays run
# a third time built with AddressSanitizer + UndefinedBehaviorSanitizer (build-asan/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/build.sh
cd build
# serial: the end-to-end tests start real clusters and time recoveries; on 2 cores, running
# them side by side only makes their timing checks race each other
ctest --output-on-failure --timeout 900 "$@"
# Then the tests that create a compute backend again, on the poisoned-handle backend
# (docs/architecture.md "Device-ready interfaces"): its buffers fault on any host access, so a
# test passes only if no code outside the backend reads or writes backend memory. (Tests that
# never create a backend cannot reach backend memory; with arguments, the same selection as the
# first pass.) SY_TEST_NO_POISON=1 skips this second pass.
POISONED='test_backend|test_switch|test_model|test_ckpt_async|test_gemm|emu_|reference|bf16|cluster|threads|train_cli|ckpt_cli|export_eval|sample|faults$|chaos|data_s3'
if [ "${SY_TEST_NO_POISON:-0}" != 1 ]; then
  echo "== again with SY_BACKEND_POISON=1"
  if [ $# -gt 0 ]; then
    SY_BACKEND_POISON=1 ctest --output-on-failure --timeout 900 "$@"
  else
    SY_BACKEND_POISON=1 ctest --output-on-failure --timeout 900 -R "$POISONED"
  fi
fi
# Then the C unit tests (test_*, emu_*) and every fuzz corpus replay (fuzz_replay_*) once more,
# built with ASan + UBSan in build-asan/ (-DSY_SANITIZE=ON: undefined behaviour aborts, ASan
# errors and leaks fail the test). Only those targets are built (sy_unit_tests): the end-to-end
# tests time recoveries that ASan's 2-3x slowdown would make flaky on 2 cores. About 1.5 min on
# 2 idle cores (build ~40 s, tests ~40 s; docs/architecture.md "Sanitizers"). Skipped with
# arguments and with SY_TEST_NO_SANITIZE=1.
if [ $# -eq 0 ] && [ "${SY_TEST_NO_SANITIZE:-0}" != 1 ]; then
  echo "== the C unit tests and fuzz replays again under ASan + UBSan (build-asan/)"
  cd ..
  # without the CUDA module: nothing here can run it, and the sanitizer flags do not belong in
  # nvcc's host compilation
  cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSY_SANITIZE=ON -DSY_CUDA=OFF >/dev/null
  cmake --build build-asan -j"$(nproc)" --target sy_unit_tests
  cd build-asan
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    ctest --output-on-failure --timeout 900 -R '^(test_|emu_|fuzz_replay_)'
fi

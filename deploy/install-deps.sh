#!/usr/bin/env bash
# Installs the Debian 12 packages switchyard needs to build, test and run.
# Idempotent: a package already installed is skipped; apt-get runs only when something is missing.
# Usage: deploy/install-deps.sh [--quiet]
set -euo pipefail

PKGS=(
  # build
  build-essential cmake pkg-config
  # math and threads
  libopenblas-dev libopenblas-openmp-dev
  # config, JSON, unit tests
  libcyaml-dev libjansson-dev libcmocka-dev
  # control plane, storage, status endpoint (later issues build on these)
  libzmq3-dev libprotobuf-c-dev protobuf-c-compiler libcurl4-openssl-dev libmicrohttpd-dev
  # reference tests (PyTorch for /usr/bin/python3), Prometheus parser
  python3 python3-torch python3-numpy python3-prometheus-client python3-yaml
  # deployment file checks (tests/py/test_deploy.py; systemd-analyze and kubectl are used when present)
  shellcheck
  # the dashboard's charting library, built into the coordinator (CMakeLists.txt embeds it)
  libjs-dygraphs
  # the dashboard's browser test (tests/py/test_dashboard.py; skipped without them)
  chromium chromium-driver
  # a real one-node Slurm cluster for tests/py/test_slurm.py (skipped without them)
  slurm-wlm munge
  # default corpus
  fortunes fortunes-min
  # tools the tests drive (openssl: the self-signed certificate of tests/py/test_status_hardening.py)
  curl procps openssl
)

# moto_server (the S3 server of the tests) is a Python package, not a Debian one: use the pyenv
# Python when there is one (system pip is locked by PEP 668), else pip's --user install.
ensure_moto() {
  command -v moto_server >/dev/null 2>&1 && return 0
  local py
  for py in "${PYENV_ROOT:-$HOME/.pyenv}/shims/python3" python3; do
    command -v "$py" >/dev/null 2>&1 || continue
    "$py" -c 'import moto.server' 2>/dev/null && return 0
    "$py" -m pip --version >/dev/null 2>&1 || continue
    echo "install-deps: pip install moto[server] ($py)"
    if [[ "$py" == */shims/* ]]; then
      "$py" -m pip install -q "moto[server]" && return 0
    else
      "$py" -m pip install -q --user --break-system-packages "moto[server]" && return 0
    fi
  done
  echo "install-deps: could not install moto[server]; tests/py/test_s3_store.py needs it" >&2
}

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  ensure_moto
  [ "${1:-}" = "--quiet" ] || echo "install-deps: all ${#PKGS[@]} packages present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
ensure_moto
echo "install-deps: done"

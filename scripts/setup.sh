#!/usr/bin/env bash
# Idempotent set-up for a fresh clone on a fresh Debian/Ubuntu machine:
# the Debian packages the tests and `cachegate dev` run for real, a
# virtual environment, and the project with its dev extras. A second run
# only checks and returns quickly.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
DEBS=(redis-server redis-tools postgresql jq stunnel4 libjemalloc2)

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v jq >/dev/null || missing+=(jq)
command -v stunnel4 >/dev/null || missing+=(stunnel4)  # python -m bench: the baseline
ls /usr/lib/*/libjemalloc.so.2 >/dev/null 2>&1 || missing+=(libjemalloc2)  # dbproxy's allocator
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${DEBS[@]}" >/dev/null
  # The packages' own system services are not used: tests and `cachegate dev`
  # start their own servers on free loopback ports.
  $SUDO service redis-server stop >/dev/null 2>&1 || true
  $SUDO service stunnel4 stop >/dev/null 2>&1 || true
fi

stamp=.venv/.installed
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PY" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing Python packages into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch "$stamp"
fi

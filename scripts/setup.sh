#!/usr/bin/env bash
# Creates .venv (if missing) and installs the given requirement files into it (default:
# requirements.txt). Used by demo.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
args=()
for f in "${@:-requirements.txt}"; do args+=(-r "$f"); done
.venv/bin/python -m pip install -q "${args[@]}"

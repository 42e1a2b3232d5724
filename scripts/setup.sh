#!/usr/bin/env bash
# Creates a virtual environment (if missing; $VENV, default .venv, with $PYTHON, default python3) and
# installs into it the given requirement files and package specs (default: requirements.txt). Used by
# demo.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
args=()
for f in "${@:-requirements.txt}"; do
  if [ -f "$f" ]; then args+=(-r "$f"); else args+=("$f"); fi
done
"$VENV/bin/python" -m pip install -q "${args[@]}"

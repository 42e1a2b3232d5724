#!/usr/bin/env bash
# Sets up .venv and runs the test suite on CPU with 8 fake devices (tests/conftest.py sets them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q tests "$@"

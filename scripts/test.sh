#!/usr/bin/env bash
# Sets up .venv with everything the tests need and runs them on CPU with 8 fake devices
# (tests/conftest.py sets them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements.txt requirements-test.txt requirements-tpu.txt
.venv/bin/python -m pytest -q tests "$@"

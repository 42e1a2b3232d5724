#!/usr/bin/env bash
# Sets up a virtual environment with everything the tests need and runs them on CPU with 8 fake
# devices (tests/conftest.py sets them). CI (.ci/run) runs the first two:
#   bash scripts/test.sh          the pinned set (requirements*.txt) on Python 3.11 in .venv: every test
#   bash scripts/test.sh newest   the newest releases (requirements-newest.txt, no pins) on Python 3.12
#                                 in .venv-newest: every test but the parity tests against transformers,
#                                 which skip (PyPI has only CUDA builds of torch for 3.12)
#   bash scripts/test.sh quick    the inner loop, in .venv: the unit tests that are not slow (pytest -m
#                                 "unit and not slow": no training run, no subprocess; the tiers are in
#                                 pytest.ini), under 3 minutes on 2 cores; its compilation cache stays
#                                 in .jax-cache/ between runs. Before you push, run the whole suite.
# Further arguments go to pytest (after `quick` or `newest`), e.g. `bash scripts/test.sh quick
# tests/test_sft.py`, or `-m e2e`, `-m parity`, `-m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
selection=()
if [ "${1:-}" = quick ]; then
  shift
  selection=(-m 'unit and not slow')
  # Kept across runs: an entry is found again only for the very same program, jax and flags.
  export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR-$PWD/.jax-cache}
fi
if [ "${1:-}" = newest ]; then
  shift
  if [ -z "${PYTHON:-}" ]; then  # the first Python 3.12 that runs: on PATH, else pyenv's
    for p in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3.12; do
      if "$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then PYTHON=$p; break; fi
    done
  fi
  export PYTHON=${PYTHON:?no Python 3.12 found; set PYTHON=/path/to/python3.12}
  export VENV=.venv-newest
  # requirements-test.txt installs no torch or transformers on 3.12; jax[tpu] brings the libtpu that
  # matches the newest jax, for train.compile.
  bash scripts/setup.sh requirements-newest.txt requirements-eval.txt requirements-test.txt 'jax[tpu]'
else
  export VENV=.venv
  bash scripts/setup.sh requirements.txt requirements-eval.txt requirements-test.txt requirements-tpu.txt
fi
"$VENV/bin/python" -c 'import sys, jax, flax; print(f"Python {sys.version.split()[0]}, jax {jax.__version__}, flax {flax.__version__}")'
"$VENV/bin/python" -m pytest -q -rs "${selection[@]}" tests "$@"

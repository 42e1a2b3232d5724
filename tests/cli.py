"""Runs one of the project's commands as a program (`python -m module args...`), as a user would.

absl flags are process-global and every command defines its own, so commands run in a subprocess; it
inherits the test environment (8 fake CPU devices, see conftest.py).
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(module: str, *args: str, timeout: float = 300, **env) -> subprocess.CompletedProcess:
  environment = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu', **env}
  return subprocess.run([sys.executable, '-m', module, *map(str, args)], cwd=ROOT, env=environment,
                        capture_output=True, text=True, timeout=timeout, check=False)

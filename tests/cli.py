"""Runs the project's commands as programs (`python -m module args...`), as a user would: the one
place where tests start a Python subprocess.

absl flags are process-global and every command defines its own, so commands run in a subprocess. It
inherits the test environment (8 fake CPU devices, the session's compilation cache: see conftest.py),
with the project importable and JAX on the CPU, and runs in the repository root (ROOT), where the
commands' relative paths (configs/tiny.py) resolve.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


def command_env(devices: int | None = None, **env: str | None) -> dict:
  """The environment of a command run by a test: this process's, with the project on PYTHONPATH, JAX
  on the CPU with `devices` fake devices (None: as here, 8), and `env` on top (a None value removes
  that variable)."""
  environment = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'}
  if devices is not None:
    environment['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  environment.update(env)
  return {k: v for k, v in environment.items() if v is not None}


def run_python(*args, timeout: float = 300, devices: int | None = None, merge_output: bool = False,
               input: str | None = None,  # pylint: disable=redefined-builtin
               **env: str | None) -> subprocess.CompletedProcess:
  """Runs `python args...` to its end in ROOT: returncode, stdout and stderr as text (stderr merged
  into stdout with `merge_output`, in the order written). A command still running after `timeout`
  seconds is killed and fails the test, showing the end of what it printed. `devices` and `env` as in
  command_env."""
  cmd = [sys.executable, *map(str, args)]
  try:
    return subprocess.run(cmd, cwd=ROOT, env=command_env(devices, **env), input=input, text=True,
                          stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
                          timeout=timeout, check=False)
  except subprocess.TimeoutExpired as e:
    printed = e.output.decode(errors='replace') if isinstance(e.output, bytes) else (e.output or '')
    pytest.fail(f'still running after {timeout} s: {" ".join(cmd[1:])}\n{printed[-3000:]}')


def run_cli(module: str, *args, timeout: float = 300, devices: int | None = None,
            merge_output: bool = False, **env: str | None) -> subprocess.CompletedProcess:
  """Runs `python -m module args...` to its end: see run_python."""
  return run_python('-m', module, *args, timeout=timeout, devices=devices, merge_output=merge_output,
                    **env)


def start_python(*args, log: str | None = None, devices: int | None = None,
                 **env: str | None) -> subprocess.Popen:
  """Starts `python args...` in ROOT and returns at once. Its stdout and stderr go, together, to the
  file `log` (its path is `proc.log_path`), or else to a pipe (`proc.communicate()` reads them).
  `devices` and `env` as in command_env."""
  if log is None:
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=command_env(devices, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  with open(log, 'w', encoding='utf-8') as out:  # the child holds its own copy of the file
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=command_env(devices, **env),
                            stdout=out, stderr=subprocess.STDOUT)
  proc.log_path = log
  return proc


def start_cli(module: str, *args, log: str | None = None, devices: int | None = None,
              **env: str | None) -> subprocess.Popen:
  """Starts `python -m module args...`: see start_python."""
  return start_python('-m', module, *args, log=log, devices=devices, **env)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
  """Waits for a started command: (its exit status, what it printed). Fails the test, showing the end
  of the output, if it is still running after `timeout` seconds (and then kills it)."""
  try:
    if getattr(proc, 'log_path', None) is None:
      out, _ = proc.communicate(timeout=timeout)
    else:
      proc.wait(timeout=timeout)
      with open(proc.log_path, encoding='utf-8', errors='replace') as f:
        out = f.read()
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    pytest.fail(f'still running after {timeout} s: {" ".join(map(str, proc.args[1:]))}')
  return proc.returncode, out


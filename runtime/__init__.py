"""What every program that runs JAX does first and last, and the command-line conventions they share.

`run(main)` starts every entry point (the trainers, train.compile, train.benchmark, train.checkpoint,
model.generate, model.convert, model.evaluate) in place of absl's `app.run`, and `setup()` is the
first thing their main does: the C allocator's setting for CPU hosts (runtime/host_memory.py, before JAX
starts a backend), a log that keeps libraries' warnings but only our own INFO lines, and joining a
multi-process run when one is configured or detected.

A failure ends the program within seconds, as one line for a person (`error: ...`, naming the file,
key or step and what to do; a library's error is cut to its first line), with the full traceback in a
file (in the `--workdir` when the command has one, else in the temporary folder; `--traceback` also
prints it). The process then leaves with os._exit once its output is flushed: a normal interpreter
exit can wait forever on tf.data's worker threads, which need the lock that the exiting thread holds
while it destroys their iterator. Exit status: 0, 1 for a failure, 130 when interrupted.

Flags are absl flags everywhere, as the trainers' ml_collections config overrides (`--config.a.b=v`)
need: one grammar, `--helpfull` and flag files for every command. Multi-word flags also take dashes
(`--max-new-tokens` for `--max_new_tokens`).
"""

import collections
import contextlib
import errno
import functools
import logging as std_logging
import os
import socket
import sys
import tempfile
import threading
import time
import traceback
from typing import Callable, Mapping, Sequence

# Before JAX (and TensorFlow) load, as model/__init__.py explains: errors only from their C++ logs, and
# no oneDNN announcement from TensorFlow. The trainers import this package first.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

import jax  # pylint: disable=wrong-import-position
from absl import app, flags, logging  # pylint: disable=wrong-import-position
from etils import epath  # pylint: disable=wrong-import-position

from runtime import host_memory  # pylint: disable=wrong-import-position

_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup(distributed: Mapping | None = None, keep_freed_memory: bool = True) -> None:
  """Process-wide setup; `distributed`: config.distributed (coordinator_address, num_processes,
  process_id), or None to rely on detection alone."""
  if keep_freed_memory:
    host_memory.keep_freed_memory()  # before JAX starts its CPU backend
  quiet_library_logs()
  maybe_initialize_distributed(**(distributed or {}))


# Tracebacks that libraries logged with their errors (orbax logs one per background thread, dozens of
# lines each): kept out of the console, and written into the traceback file of a failure.
_LIBRARY_TRACEBACKS = collections.deque(maxlen=20)


class _LibraryInfoFilter(std_logging.Filter):
  """Keeps libraries' warnings and errors, without their tracebacks, but only our own INFO lines
  (orbax alone logs a dozen per checkpoint), so that the training log stays readable."""

  def filter(self, record):
    ours = record.pathname.startswith(_PROJECT_ROOT) and 'site-packages' not in record.pathname
    if not ours and record.exc_info and record.exc_info[0] is not None:
      _LIBRARY_TRACEBACKS.append(f'{record.getMessage()}\n'
                                 + ''.join(traceback.format_exception(*record.exc_info)))
      record.exc_info = record.exc_text = None
    return ours or record.levelno >= std_logging.WARNING


def quiet_library_logs():
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
    handler.addFilter(_LibraryInfoFilter())


def maybe_initialize_distributed(coordinator_address: str = '', num_processes: int = 0,
                                 process_id: int = -1, initialization_timeout_s: int = 300) -> bool:
  """Joins a multi-process JAX run when one is configured or detected. Returns whether it did.

  Explicit arguments win (any cluster, CPU included). Otherwise Cloud TPU VMs (found by their TPU
  device files; JAX then reads the slice's workers from the metadata server, and a single-host slice
  simply becomes one process), GKE TPU pods and SLURM jobs with several tasks are detected, and JAX
  fills in the details itself. Every process waits up to `initialization_timeout_s` for the others;
  JAX ends a process that times out with a fatal log line (it cannot be caught), so processes other
  than 0 first wait for the coordinator's port themselves, which fails as an error naming it.
  """
  if jax.distributed.is_initialized():
    return True
  # CPU processes need a collectives backend to talk to each other; harmless on accelerators.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if coordinator_address:
    logging.info('Joining a run of %d processes as process %d (coordinator %s, waiting up to %d s)',
                 num_processes, process_id, coordinator_address, initialization_timeout_s)
    if process_id != 0:
      _wait_for_coordinator(coordinator_address, initialization_timeout_s, process_id, num_processes)
    jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=initialization_timeout_s)
    return True
  tpu_hosts = [h for h in os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]
  if (host_memory.has_device_node(host_memory.TPU_NODES) or len(tpu_hosts) > 1
      or int(os.environ.get('SLURM_NTASKS', '1')) > 1):
    jax.distributed.initialize()
    return True
  return False


def _wait_for_coordinator(address: str, timeout_s: float, process_id: int, num_processes: int):
  host, _, port = address.rpartition(':')
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip('[]'), int(port)), timeout=2):
        return
    except OSError as e:
      if time.monotonic() > deadline:
        raise ConnectionError(
            f'process {process_id} of {num_processes} found no coordinator at {address} within '
            f'{timeout_s:g} s ({e.strerror or e}): config.distributed.coordinator_address must be '
            'process 0\'s host and a free port, reachable from every host, and process 0 must be '
            'started too (config.distributed.initialization_timeout_s sets the wait)') from None
      time.sleep(0.5)


# --------------------------------------------------------------------------------------------------
# Ending a program

def run(main: Callable[[list[str]], int | None]):
  """`app.run(main)` for an entry point: its flags parsed by absl, a failure reported as one line
  with the traceback in a file, and the process ended with os._exit (see the module docstring)."""
  flags.DEFINE_bool('traceback', False, 'On a failure, also print the full traceback here (it always '
                    'goes to a file, named in the error line).')
  sys.unraisablehook = _unraisable
  app.run(functools.partial(_run_and_exit, main))


def _unraisable(unraisable):
  """Errors that nothing can catch (C extensions report them with PyErr_WriteUnraisable): after a
  failed checkpoint write, TensorStore calls back into orbax's closed event loops dozens of times.
  One line per distinct error; their tracebacks go to the traceback file of a failure."""
  text = ''.join(traceback.format_exception(unraisable.exc_type, unraisable.exc_value,
                                            unraisable.exc_traceback))
  if text not in _LIBRARY_TRACEBACKS:
    print(f'{unraisable.exc_type.__name__}: {unraisable.exc_value} (in a library callback; ignored)',
          file=sys.stderr)
    _LIBRARY_TRACEBACKS.append(text)


def _run_and_exit(main, argv):
  try:
    code = main(argv) or 0
    if jax.distributed.is_initialized():
      jax.distributed.shutdown()  # what the normal exit would do; every host gets here
  except SystemExit as e:  # sys.exit(...) inside main: a message (status 1) or a status
    if isinstance(e.code, str):
      print(e.code, file=sys.stderr)
    code = 1 if isinstance(e.code, str) else (e.code or 0)
  except app.UsageError as e:
    print(f'error: {e} (--helpshort lists the flags)', file=sys.stderr)
    code = 1
  except BaseException as e:  # pylint: disable=broad-exception-caught
    report_failure(e)
    code = 130 if isinstance(e, KeyboardInterrupt) else 1
  _exit(code)


def report_failure(error: BaseException):
  """Prints the line(s) a person reads about `error`, after writing its full traceback to a file."""
  text = ''.join(traceback.format_exception(error))
  logged = ''.join(f'\n\nLogged by a library before:\n{t}' for t in _LIBRARY_TRACEBACKS)
  path = _write_traceback(f'{" ".join(sys.argv)}\n{time.ctime()}, host {socket.gethostname()}, '
                          f'pid {os.getpid()}\n\n{text}{logged}')
  for handler in std_logging.getLogger().handlers + [logging.get_absl_handler()]:
    handler.flush()  # the log so far comes first
  verbose = 'traceback' in flags.FLAGS and flags.FLAGS.traceback
  if verbose:
    print(text, file=sys.stderr)
  print('error: ' + '\n       '.join(describe(error).split('\n')), file=sys.stderr)
  if path:
    print(f'(full traceback: {path}{"" if verbose else "; --traceback prints it here"})',
          file=sys.stderr)


def describe(error: BaseException) -> str:
  """What went wrong, for a person. The project's own errors say it themselves (the file, line, key
  or step, and what to do); an error raised inside a library is its type and first line, with what it
  usually means where that is known."""
  if isinstance(error, KeyboardInterrupt):
    return 'interrupted; checkpoints already written are intact'
  message = str(error).strip()
  if message and _raised_by_project(error):
    return message
  first = message.split('\n', 1)[0]
  first = first[:300] + (' ...' if len(first) > 300 else '')
  hint = _hint(error)
  return f'{type(error).__name__}{": " + first if first else ""}' + (f' ({hint})' if hint else '')


def _raised_by_project(error: BaseException) -> bool:
  frames = traceback.extract_tb(error.__traceback__)
  return bool(frames) and frames[-1].filename.startswith(_PROJECT_ROOT) and (
      'site-packages' not in frames[-1].filename)


def _hint(error: BaseException) -> str:
  text = str(error)
  code = getattr(error, 'errno', None)
  if code == errno.ENOSPC or 'No space left on device' in text:
    return 'no space left on the device: free some, or use another folder, and run the same command again'
  if code in (errno.EACCES, errno.EPERM, errno.EROFS) or 'Permission denied' in text:
    return 'permission denied: check that this user may write there'
  if isinstance(error, MemoryError) or 'RESOURCE_EXHAUSTED' in text:
    return 'out of memory: use a smaller batch or model, or shard over more devices'
  if 'DEADLINE_EXCEEDED' in text or 'UNAVAILABLE' in text:
    return 'another process of a multi-process run may have failed or be unreachable; see its log'
  return 'unexpected: the traceback file says where'


def _write_traceback(text: str) -> str | None:
  """Writes `text` into `<workdir>/errors/` (given a --workdir flag), else into the temporary folder.
  Returns the file's path, or None if nothing could be written."""
  program = os.path.splitext(os.path.basename(sys.argv[0]))[0] or 'flaxlm'
  name = f'{time.strftime("%Y%m%d-%H%M%S")}-{program}-{socket.gethostname()}-{os.getpid()}.txt'
  folders = [os.path.join(tempfile.gettempdir(), 'flaxlm-errors')]
  workdir = flags.FLAGS['workdir'].value if 'workdir' in flags.FLAGS else None
  if isinstance(workdir, str) and workdir:
    folders.insert(0, os.path.join(workdir, 'errors'))
  for folder in folders:
    written = []

    def write(folder=folder):
      try:
        epath.Path(folder).mkdir(parents=True, exist_ok=True)
        (epath.Path(folder) / name).write_text(text)
        written.append(os.path.join(folder, name))
      except Exception:  # pylint: disable=broad-exception-caught  (the next folder, then none)
        pass
    writer = threading.Thread(target=write, daemon=True)  # remote storage may be what failed
    writer.start()
    writer.join(timeout=10)
    if written:
      return written[0]
  return None


def _exit(code: int):
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  std_logging.shutdown()
  os._exit(code)  # pylint: disable=protected-access


# --------------------------------------------------------------------------------------------------
# Command lines

def format_size(nbytes: float) -> str:
  """A size for people: in GiB, or in MiB under 0.01 GiB (a tiny model's 0.00 GiB says nothing)."""
  if nbytes >= 0.01 * 2 ** 30:
    return f'{nbytes / 2 ** 30:.2f} GiB'
  return f'{nbytes / 2 ** 20:.2f} MiB'


def dashed_aliases(names: Sequence[str]):
  """`--a-b` for each flag `a_b` in `names` (the spelling our commands have always accepted)."""
  for name in names:
    if '_' in name:
      flags.DEFINE_alias(name.replace('_', '-'), name)


def parse_command(argv: Sequence[str], commands: Mapping[str, Sequence[str]],
                  default: str | None = None) -> str:
  """The subcommand of `prog COMMAND --flags... [ARGS...]` (argv as absl leaves it; `prog --flags...`
  means `default` where there is one), checked: known, the flags `commands[COMMAND]` names are set,
  and positional arguments only where it names some with a trailing '...' (e.g. 'workdir...': one or
  more). Raises app.UsageError."""
  known = ', '.join(commands)
  if len(argv) < 2 and default is None:
    raise app.UsageError(f'give a command: {known}')
  command, extra = (argv[1], argv[2:]) if len(argv) > 1 else (default, [])
  if command not in commands:
    raise app.UsageError(f'unknown command {command!r}; expected one of: {known}')
  positional = [name[:-3] for name in commands[command] if name.endswith('...')]
  if extra and not positional:
    raise app.UsageError(f'unexpected arguments {extra}')
  if positional and not extra:
    raise app.UsageError(f'{command} needs at least one {positional[0]}')
  missing = [f'--{name}' for name in commands[command]
             if not name.endswith('...') and flags.FLAGS[name].value in (None, '', [])]
  if missing:
    raise app.UsageError(f'{command} needs {", ".join(missing)}')
  return command


@contextlib.contextmanager
def flag_error(name: str):
  """Inside the block, an error about what flag `name` gives (a path that does not exist or holds the
  wrong thing, a value out of range) becomes a usage error naming the flag."""
  try:
    yield
  except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
    raise app.UsageError(f'--{name.replace("_", "-")}: {e}') from None


def check_output_file(name: str, path: str):
  """A file that the command writes when its work is done: its folder must exist before the work."""
  if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
    raise app.UsageError(f'--{name.replace("_", "-")}: the folder of {path} does not exist')


def no_positional_arguments(argv: Sequence[str]):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {list(argv[1:])}')

"""What every program that runs JAX does first, and the command-line conventions they share.

`setup()` is called at the start of every entry point's main (the trainers, train.compile,
train.benchmark, model.generate, model.convert, model.evaluate): the C allocator's setting for CPU
hosts (model/host_memory.py, before JAX starts a backend), a log that keeps libraries' warnings but only
our own INFO lines, and joining a multi-process run when one is configured or detected. Flags are absl
flags everywhere, as the trainers' ml_collections config overrides (`--config.a.b=v`) need: one
grammar, `--helpfull` and flag files for every command. Multi-word flags also take dashes
(`--max-new-tokens` for `--max_new_tokens`).
"""

import logging as std_logging
import os
from typing import Mapping, Sequence

import jax
from absl import app, flags, logging

from model import host_memory

_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup(distributed: Mapping | None = None, keep_freed_memory: bool = True) -> None:
  """Process-wide setup; `distributed`: config.distributed (coordinator_address, num_processes,
  process_id), or None to rely on detection alone."""
  if keep_freed_memory:
    host_memory.keep_freed_memory()  # before JAX starts its CPU backend
  quiet_library_logs()
  maybe_initialize_distributed(**(distributed or {}))


class _LibraryInfoFilter(std_logging.Filter):
  """Keeps libraries' warnings and errors but only our own INFO lines (orbax alone logs a dozen per
  checkpoint), so that the training log stays readable."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or (
        record.pathname.startswith(_PROJECT_ROOT) and 'site-packages' not in record.pathname)


def quiet_library_logs():
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
    handler.addFilter(_LibraryInfoFilter())


def maybe_initialize_distributed(coordinator_address: str = '', num_processes: int = 0,
                                 process_id: int = -1) -> bool:
  """Joins a multi-process JAX run when one is configured or detected. Returns whether it did.

  Explicit arguments win (any cluster, CPU included). Otherwise Cloud TPU VMs (found by their TPU
  device files; JAX then reads the slice's workers from the metadata server, and a single-host slice
  simply becomes one process), GKE TPU pods and SLURM jobs with several tasks are detected, and JAX
  fills in the details itself.
  """
  if jax.distributed.is_initialized():
    return True
  # CPU processes need a collectives backend to talk to each other; harmless on accelerators.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return True
  tpu_hosts = [h for h in os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]
  if (host_memory.has_device_node(host_memory.TPU_NODES) or len(tpu_hosts) > 1
      or int(os.environ.get('SLURM_NTASKS', '1')) > 1):
    jax.distributed.initialize()
    return True
  return False


# --------------------------------------------------------------------------------------------------
# Command lines

def dashed_aliases(names: Sequence[str]):
  """`--a-b` for each flag `a_b` in `names` (the spelling our commands have always accepted)."""
  for name in names:
    if '_' in name:
      flags.DEFINE_alias(name.replace('_', '-'), name)


def parse_command(argv: Sequence[str], commands: Mapping[str, Sequence[str]],
                  default: str | None = None) -> str:
  """The subcommand of `prog COMMAND --flags...` (argv as absl leaves it; `prog --flags...` means
  `default` where there is one), checked: known, no other positional arguments, and the flags
  `commands[COMMAND]` names are set. Raises app.UsageError."""
  known = ', '.join(commands)
  if len(argv) < 2 and default is None:
    raise app.UsageError(f'give a command: {known}')
  command, extra = (argv[1], argv[2:]) if len(argv) > 1 else (default, [])
  if command not in commands:
    raise app.UsageError(f'unknown command {command!r}; expected one of: {known}')
  if extra:
    raise app.UsageError(f'unexpected arguments {extra}')
  missing = [f'--{name}' for name in commands[command] if flags.FLAGS[name].value in (None, '', [])]
  if missing:
    raise app.UsageError(f'{command} needs {", ".join(missing)}')
  return command


def no_positional_arguments(argv: Sequence[str]):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {list(argv[1:])}')

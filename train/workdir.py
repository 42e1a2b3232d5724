"""What a run keeps in its workdir besides checkpoints, and the checks made on it.

`run.lock` (one run per workdir, see `RunLock`), `config.json` (the run's config, and the check that a
resumed run still matches it), `eval_results.json` (every held-out evaluation, across resumptions) and
`final_metrics.json` (also what tells that a run has finished). Local files are replaced atomically;
on object stores (gs://) a single write is atomic already.
"""

import contextlib
import fcntl
import functools
import json
import os
import secrets
import socket
import sys
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from data import config as data_config
from model.weights.params import is_remote, saved_steps
from train import validate
from train.spec import Spec

LOCK = 'run.lock'
FINAL_METRICS = 'final_metrics.json'

# Keys a resumed run may change (field metadata in train/spec.py): how long to train, how often and how
# to log/eval/save (early stopping included), and the mesh (a checkpoint restores onto any mesh).
# Everything else changes the run itself.
RESUME_MAY_CHANGE = Spec.resumable_keys()


def _flatten(tree, prefix=''):
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f'{prefix}{key}.').items()}
  return {prefix[:-1]: tree}


def default_sections_json() -> dict:
  """The spec's sections and the data section with their defaults, as config.json writes them."""
  sections = {name: cls().to_dict() for name, cls in Spec.SECTIONS.items()}
  return json.loads(json.dumps({**sections, 'data': data_config.get_config().to_dict()}))


def check_config(config: Any, workdir: str, has_checkpoint: bool):
  """Refuses to resume a workdir whose run used a different config, unless told to override."""
  path = epath.Path(workdir) / 'config.json'
  if not has_checkpoint or not path.exists():
    return
  saved = _flatten(json.loads(path.read_text()))
  current = _flatten(json.loads(config.to_json_best_effort()))
  # A setting added to the project since the run began is the same run while it keeps its default.
  defaults = _flatten(default_sections_json())
  changed = [f'{k}: {saved.get(k, "<absent>")!r} -> {current.get(k, "<absent>")!r}'
             for k in sorted(set(saved) | set(current))
             if saved.get(k) != current.get(k) and not k.startswith(RESUME_MAY_CHANGE)
             and not (k not in saved and k in defaults and current.get(k) == defaults[k])]
  if changed and not config.train.override_workdir_config:
    raise validate.ConfigError(
        f'{workdir} holds a run with a different config; resuming it would mix two runs:\n  '
        + '\n  '.join(changed) + '\nUse a new --workdir, or pass '
        '--config.train.override_workdir_config=True to resume with the new values.')


def write_config(workdir: str, config: Any):
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  write_text(epath.Path(workdir) / 'config.json', config.to_json_best_effort(indent=2))


def write_json(path, value, append_to_existing: bool = False):
  """With `append_to_existing`, `value` (a list) extends what a previous run of the same workdir
  wrote, minus entries for steps this run has redone."""
  path = epath.Path(path)
  if append_to_existing and path.exists():
    earlier = json.loads(path.read_text())
    first_step = value[0]['step']
    value = [e for e in earlier if e['step'] < first_step] + value
  write_text(path, json.dumps(value, indent=2))


def write_text(path, text: str):
  path = epath.Path(path)
  if is_remote(path):
    path.write_text(text)
    return
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(text, encoding='utf-8')
  tmp.replace(path)


def finished_run(workdir: str, steps: int) -> dict | None:
  """The final metrics of the run in `workdir` if it has trained to `steps` already (its last
  checkpoint and its final_metrics.json both at or past `steps`, and not from a stop), else None."""
  path = epath.Path(workdir) / FINAL_METRICS
  saved = saved_steps(epath.Path(workdir) / 'checkpoints')
  if not saved or saved[-1] < steps or not path.exists():
    return None
  final = json.loads(path.read_text())
  return final if final.get('step', -1) >= steps and 'stopped_at' not in final else None


# --------------------------------------------------------------------------------------------------
# One run per workdir

class WorkdirLocked(RuntimeError):
  """Another run holds the workdir."""


def _process_start(pid: int) -> str:
  """The start time of a process, in clock ticks since boot ('' where /proc has none): with the pid,
  it tells a process apart from a later one that reuses the pid."""
  try:
    with open(f'/proc/{pid}/stat', encoding='utf-8') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return ''


def _program() -> str:
  """The running command as `python -m` names it (e.g. train.pretrain)."""
  spec = getattr(sys.modules.get('__main__'), '__spec__', None)
  return spec.name if spec else os.path.basename(sys.argv[0])


def _alive(holder: dict) -> bool:
  """Whether the process that wrote `holder` (on this host) still runs."""
  try:
    os.kill(int(holder['pid']), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, KeyError, ValueError, TypeError):
    return True
  return holder.get('process_start', '') in ('', _process_start(int(holder['pid'])))


def _describe(holder: dict) -> str:
  if not holder:
    return 'a run whose lock file is unreadable'
  return (f"{holder.get('program', 'a run')}, pid {holder.get('pid')} on host {holder.get('host')}, "
          f"started {holder.get('started')}")


class RunLock:
  """One run per workdir: process 0 holds `<workdir>/run.lock` for the run's lifetime, and every
  process learns whether it got it.

  Local workdirs: the lock file is created with its content (host, pid, start time, command) in one
  step (a hard link, which fails if the file exists) and held with an OS lock (flock) that the kernel
  drops when the process dies. A lock whose flock is free and whose process is gone on this host is
  stale: it is taken over with a warning. Anything else refuses, naming the holder. gs:// workdirs: a
  create-only-if-absent object write (a GCS generation precondition, via google-cloud-storage);
  stale locks of this host are taken over the same way. `take_over=True` takes any lock.
  """

  def __init__(self, workdir: str, take_over: bool = False):
    self.path = epath.Path(workdir) / LOCK
    self.take_over = take_over
    self._release = None
    self.info = {'host': socket.gethostname(), 'pid': os.getpid(),
                 'process_start': _process_start(os.getpid()),
                 'started': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
                 'program': _program(), 'command': ' '.join(sys.argv)[:1000],
                 'token': secrets.token_hex(8)}

  def __enter__(self):
    error = ''
    if jax.process_index() == 0:
      try:
        if str(self.path).startswith('gs://'):
          self._release = self._acquire_gcs()
        elif is_remote(self.path):
          logging.warning('%s is not locked: only local and gs:// workdirs can be', self.path.parent)
        else:
          self._release = self._acquire_local()
      except WorkdirLocked as e:
        error = str(e)
    if jax.process_count() > 1:  # every host stops if process 0 could not lock
      failed = np.max(multihost_utils.process_allgather(np.int32(bool(error))))
      if failed and not error:
        error = f'process 0 could not lock {self.path.parent} (see its log)'
    if error:
      raise WorkdirLocked(error)
    return self

  def __exit__(self, *exc):
    if self._release is not None:
      self._release()
      self._release = None

  def _refuse(self, holder: dict):
    raise WorkdirLocked(
        f'{self.path.parent} is in use by another run: {_describe(holder)}. Wait for it to end, or '
        f'stop it; if it is gone (e.g. its host died), run again with '
        f'--config.train.take_over_lock=True (or delete {self.path}).')

  def _taking_over(self, holder: dict):
    logging.warning('Taking over the lock of %s: %s (%s)', self.path.parent, _describe(holder),
                    'told to' if self.take_over else 'that process is gone')

  # Local files ------------------------------------------------------------------------------------

  def _acquire_local(self):
    self.path.parent.mkdir(parents=True, exist_ok=True)
    path, mine = str(self.path), f'{self.path}.{self.info["host"]}.{os.getpid()}.tmp'
    with open(mine, 'w', encoding='utf-8') as f:
      json.dump(self.info, f)
    fd = os.open(mine, os.O_RDWR)
    _flock(fd)
    try:
      while True:
        try:
          os.link(mine, path)  # the lock, content and all, or FileExistsError
          return functools.partial(self._release_local, fd)
        except FileExistsError:
          pass
        try:
          held = os.open(path, os.O_RDWR)
        except FileNotFoundError:
          continue  # released meanwhile: try again
        with open(path, encoding='utf-8') as f:
          holder = _parse(f.read())
        free = _flock(held)
        if self.take_over or (free and holder.get('host') == self.info['host'] and not _alive(holder)):
          self._taking_over(holder)
          os.ftruncate(held, 0)
          os.pwrite(held, json.dumps(self.info).encode(), 0)
          os.close(fd)
          return functools.partial(self._release_local, held)
        os.close(held)
        os.close(fd)
        self._refuse(holder)
    finally:
      os.unlink(mine)

  def _release_local(self, fd: int):
    with contextlib.suppress(OSError):
      with open(self.path, encoding='utf-8') as f:
        if _parse(f.read()).get('token') == self.info['token']:
          os.unlink(self.path)
    os.close(fd)

  # gs:// ------------------------------------------------------------------------------------------

  def _acquire_gcs(self):
    try:
      from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
      from google.cloud import storage  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise WorkdirLocked('locking a gs:// workdir needs google-cloud-storage: pip install '
                          'google-cloud-storage, or run without a lock with '
                          '--config.train.take_over_lock=True') from None
    bucket, _, name = str(self.path)[len('gs://'):].partition('/')
    blob = storage.Client().bucket(bucket).blob(name)
    text = json.dumps(self.info)
    try:
      blob.upload_from_string(text, if_generation_match=0)
    except exceptions.PreconditionFailed:
      blob.reload()
      holder = _parse(blob.download_as_text(if_generation_match=blob.generation))
      if not (self.take_over or (holder.get('host') == self.info['host'] and not _alive(holder))):
        self._refuse(holder)
      self._taking_over(holder)
      try:
        blob.upload_from_string(text, if_generation_match=blob.generation)
      except exceptions.PreconditionFailed:
        self._refuse({})  # another run took it first
    generation = blob.generation

    def release():
      try:
        blob.delete(if_generation_match=generation)
      except exceptions.PreconditionFailed:  # taken over meanwhile: it is the other run's now
        logging.warning('The lock of %s was taken over by another run', self.path.parent)
    return release


def _parse(text: str) -> dict:
  try:
    value = json.loads(text)
  except ValueError:
    return {}
  return value if isinstance(value, dict) else {}


def _flock(fd: int) -> bool:
  """Takes the OS lock of an open file if free. Returns whether this process holds it (True also
  where the file system has no such locks: then the pid decides)."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except BlockingIOError:
    return False
  except OSError:
    return True

"""A run's checkpoints: the Checkpointer, which saves the train state plus each host's input-pipeline
position with orbax (and restores a step of it), and `python -m train.checkpoint verify`.

A step folder (model/weights/params.py defines it) holds `state/` (step, params, optimizer state),
`model_config/`, `checksums.json`, and here also `data/` (one blob per host: its input pipeline's
position). Orbax writes a step to a temporary folder and renames it only when every host has
finished; the primary host checksums the finished files in orbax's background thread just before
that rename (model/weights/checksums.py), so that an interrupted save never looks like a checkpoint
and a committed one always has its manifest. Restores check it. A LoRA run saves its adapters and
their optimizer state, never the frozen base: its `lora/` item points to the base's own checkpoint
(model/weights/adapters.py). A preference run with the reference model in the state saves the
`reference/` item instead of that model. Which step a run resumes from, and what it reloads from
those pointers, is train/start.py's: this module writes, and restores what it is asked to.

  python -m train.checkpoint verify runs/tiny [runs/other ...]   # every step of these workdirs
  python -m train.checkpoint benchmark [--gib 1]                  # checksum speed (train/benchmark.py)
"""

import dataclasses
import os
import tempfile
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import flags, logging
from etils import epath
from jax.experimental import multihost_utils

from model import ModelConfig
from model.weights import checksums
from model.weights import params as params_lib
import runtime

FOLDER = 'checkpoints'  # in the workdir
DATA = 'data'  # the item holding each host's input position
# Preference tuning with the reference model in the state (no LoRA): the item naming the checkpoint its
# frozen starting parameters came from and their fingerprint, so that a resumed run reloads them.
REFERENCE = 'reference'


def folder(workdir: str) -> str:
  """A workdir's checkpoints folder."""
  return os.path.join(workdir, FOLDER)


class DataStateHandler(ocp.CheckpointHandler):
  """Writes one opaque blob per process: that host's input-pipeline position."""

  def save(self, directory: epath.Path, args: 'DataStateSave'):
    _process_file(directory).write_bytes(args.state)

  def restore(self, directory: epath.Path, args: 'DataStateRestore | None' = None) -> bytes:
    path = _process_file(directory)
    if not path.exists():
      found = sorted(p.name for p in directory.iterdir())
      raise FileNotFoundError(
          f'{path} not found: this checkpoint was written by a different number of processes '
          f'(found {found}), so the input pipeline position cannot be restored. Start a new workdir, '
          f'or resume with the same number of hosts.')
    return path.read_bytes()


def _process_file(directory: epath.Path) -> epath.Path:
  return directory / f'process_{jax.process_index()}-of-{jax.process_count()}.bin'


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: bytes


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


@dataclasses.dataclass
class _Pinned:
  """orbax preservation policy: keeps the steps in `steps`, whatever else rotates away."""
  steps: set

  def should_preserve(self, checkpoints, *, context):
    del context
    return [c.step in self.steps for c in checkpoints]


class CheckpointNotWritten(IOError):
  """A save that orbax accepted never reached storage."""


class Checkpointer:
  """Saves when asked (asynchronously by default) and keeps the last `keep` checkpoints, and the one
  `pin` names (the best, train/evaluation.py).

  The caller decides when to save; orbax's own interval logic would also save the first step. Saves
  always go through orbax's asynchronous checkpointer, whose commit calls back here to write the
  manifest; `async_save=False` waits for each save.
  """

  def __init__(self, directory: str, keep: int, async_save: bool = True,
               model_config: ModelConfig | None = None):
    self.directory = params_lib.absolute(directory)
    self._unconfirmed: int | None = None  # the last step saved, until it is seen on storage
    self._saving: int | None = None  # the step of the save in flight
    self._model_config = model_config
    self._async = async_save
    self.base: dict | None = None  # LoRA: the pointer to the base the adapters train on, saved with them
    self.reference: dict | None = None  # preference tuning: the REFERENCE item, saved with every step
    remove_incomplete(self.directory)
    self._pinned = _Pinned(set())
    keeping = ocp.checkpoint_managers.AnyPreservationPolicy(
        [ocp.checkpoint_managers.LatestN(keep), self._pinned])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=keeping, create=True, enable_async_checkpointing=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._write_manifest))
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def pin(self, step: int):
    """Keeps `step` (saved, or saved next) instead of the step pinned before; old pins go when saves
    rotate them out."""
    self._pinned.steps = {step}

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: bytes | None) -> bool:
    self.wait()  # orbax waits for the previous save anyway; this also checks that it was written
    extra = {DATA: DataStateSave(data_state)} if data_state is not None else {}
    if self.base is not None:
      extra[params_lib.LORA] = ocp.args.JsonSave(self.base)
    if self.reference is not None:
      extra[REFERENCE] = ocp.args.JsonSave(self.reference)
    items = params_lib.step_items(ocp.args.StandardSave(_without_base(state)), self._model_config,
                                  **extra)
    self._saving = step  # for the commit callback; orbax saves one step at a time
    saved = self._manager.save(step, args=items, force=True)
    if saved:
      self._unconfirmed = step
      if not self._async:
        self.wait()
    return saved

  def _write_manifest(self):
    """Orbax's commit callback (primary host, background thread): the step's files are complete in
    their temporary folder (or, on object stores, in place) and not yet committed."""
    step = self._saving
    folder = self.directory / f'{step}{params_lib.TMP_MARK}'
    checksums.write_manifest(folder if folder.exists() else self.directory / str(step))

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, bytes | None]:
    """Restores onto the shardings in `abstract_state` (any mesh), plus this host's data position,
    while the step's checksums are checked (each host reads its share). Raises DamagedCheckpoint."""
    items = {params_lib.STATE: ocp.args.StandardRestore(_without_base(abstract_state))}
    step_dir = self.directory / str(step)
    has_data = (step_dir / DATA).exists()
    if has_data:
      items[DATA] = DataStateRestore()
    restored = params_lib.restore_verified(
        step_dir, lambda: self._manager.restore(step, args=ocp.args.Composite(**items)),
        share=(jax.process_index(), jax.process_count()), anywhere=_on_any_host)
    return restored[params_lib.STATE], (restored[DATA] if has_data else None)

  def set_aside(self, step: int) -> str:
    """Renames a damaged step to `<step>.damaged` (kept for inspection, never listed as a step), so that
    the run can redo it. Returns the new name."""
    name = f'{step}.damaged'
    if jax.process_index() == 0:
      taken = {p.name for p in self.directory.iterdir()}
      name = next(n for n in [name] + [f'{name}-{i}' for i in range(2, 1000)] if n not in taken)
      (self.directory / str(step)).rename(self.directory / name)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'set aside step {step}')
    self._manager.reload()
    return name

  def wait(self):
    """Waits for the save in flight. A save that failed in orbax's background threads raises here
    (CheckpointNotWritten, saying why), so that a run never ends as if its last checkpoint were
    written."""
    step, self._unconfirmed = self._unconfirmed, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      if step is None:
        raise
      raise CheckpointNotWritten(self._not_written(step, runtime.describe(e))) from e
    if step is not None and not (self.directory / str(step) / params_lib.STATE).exists():
      raise CheckpointNotWritten(self._not_written(step, 'see the errors logged above'))

  def _not_written(self, step: int, why: str) -> str:
    saved = params_lib.saved_steps(self.directory)
    return (f'The checkpoint of step {step} was not written to {self.directory} ({why}). '
            + (f'The previous complete checkpoint, step {saved[-1]}, is intact: the same command '
               'resumes from it.' if saved else 'There is no earlier checkpoint.'))

  def close(self):
    self._manager.close()


def _on_any_host(found: bool) -> bool:
  if jax.process_count() == 1:
    return found
  return bool(np.max(multihost_utils.process_allgather(np.int32(found))))


def _without_base(state):
  """A train state as checkpoints hold it: without a LoRA run's frozen base or a preference run's
  reference model (they point to them)."""
  if not hasattr(state, 'frozen'):
    return state
  return state.replace(frozen=None, reference=None)


def remove_incomplete(directory: epath.Path) -> list[str]:
  """Removes the step folders that an interrupted save left unfinished, so that the step can be saved
  again; they are never restored (orbax only lists finalized steps). Returns their names."""
  if not directory.exists():
    return []
  names = sorted(p.name for p in directory.iterdir() if params_lib.TMP_MARK in p.name)
  if names and jax.process_index() == 0:
    logging.warning('Found %d incomplete checkpoint(s) from an interrupted save in %s: %s. They are '
                    'ignored and removed; resuming from the latest complete checkpoint.', len(names),
                    directory, ', '.join(names))
    for name in names:
      (directory / name).rmtree()
  return names


# --------------------------------------------------------------------------------------------------
# Command line

def verify_paths(paths) -> bool:
  """Checks every step of each path against its checksums, one line per step, and the base model
  that LoRA steps point to (they are nothing without it). Returns whether no step is damaged (steps
  without checksums are reported, not counted as damaged)."""
  intact, seen = True, set()
  todo = [(step_dir, '') for path in paths for step_dir in params_lib.step_dirs(path)]
  while todo:
    step_dir, role = todo.pop(0)
    if str(step_dir) in seen:
      continue
    seen.add(str(step_dir))
    start = time.perf_counter()
    report = (checksums.check(step_dir) if step_dir.exists() else
              checksums.Report('damaged', ['the folder is missing']))
    seconds = time.perf_counter() - start
    if report.status == 'damaged':
      intact = False
      print(f'{step_dir}{role}: DAMAGED: ' + '; '.join(report.problems[:5])
            + (f' (and {len(report.problems) - 5} more)' if len(report.problems) > 5 else ''))
      continue
    if report.status == 'ok':
      print(f'{step_dir}{role}: ok ({report.files} files, {report.size / 2**20:,.1f} MiB checked in '
            f'{seconds:.1f} s)')
    else:
      print(f'{step_dir}{role}: unverified: {report.problems[0]}')
    pointer = params_lib.load_base_pointer(step_dir)
    if pointer is not None:
      todo.append((epath.Path(pointer['base']), f' (the base model of {step_dir})'))
  return intact


FLAGS = flags.FLAGS  # defined by define_flags() when run as a program
COMMANDS = {'verify': ('workdir...',), 'benchmark': ()}


def main(argv):
  command = runtime.parse_command(argv, COMMANDS)
  if command == 'verify':
    if not verify_paths(argv[2:]):
      print('Damaged steps are never restored: resume with --config.checkpoint.fall_back_to_intact=True '
            'to continue from the newest intact step, or point --ckpt / config.init_from at one.')
      return 1
    return 0
  # train.benchmark stands on train.run, which stands on this module.
  from train import benchmark  # pylint: disable=import-outside-toplevel
  for line in benchmark.checksums(FLAGS.gib, FLAGS.dir or tempfile.gettempdir()):
    print(line, flush=True)
  return 0


def define_flags():
  flags.DEFINE_float('gib', 1.0, 'benchmark: size of the file to checksum, in GiB.', lower_bound=0.25)
  flags.DEFINE_string('dir', '', 'benchmark: folder for that file (default: the temporary folder).')


if __name__ == '__main__':
  define_flags()
  runtime.run(main)

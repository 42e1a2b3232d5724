"""Training checkpoints: the train state plus each host's input-pipeline position, saved by orbax.

A step folder (model/params.py defines it) holds `state/` (step, params, optimizer state),
`model_config/`, and here also `data/` (one blob per host: its input pipeline's position). Orbax
writes a step to a temporary folder and renames it only when every host has finished, so an
interrupted save never looks like a checkpoint. Also: the starting parameters of a fine-tuning run
(`config.init_from`), checked against the config.
"""

import dataclasses
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from model import ModelConfig
from model import params as params_lib
from model.config import ARCHITECTURE_FIELDS
from train import validate

DATA = 'data'  # the item holding each host's input position


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


class Checkpointer:
  """Saves when asked (asynchronously by default) and keeps the last `keep` checkpoints, and the one
  `pin` names (the best, train/evaluation.py).

  The caller decides when to save; orbax's own interval logic would also save the first step.
  """

  def __init__(self, directory: str, keep: int, async_save: bool = True,
               model_config: ModelConfig | None = None):
    self.directory = params_lib.absolute(directory)
    self._unconfirmed: int | None = None  # the last step saved, until it is seen on storage
    self._model_config = model_config
    remove_incomplete(self.directory)
    self._pinned = _Pinned(set())
    keeping = ocp.checkpoint_managers.AnyPreservationPolicy(
        [ocp.checkpoint_managers.LatestN(keep), self._pinned])
    options = ocp.CheckpointManagerOptions(preservation_policy=keeping, create=True,
                                           enable_async_checkpointing=async_save)
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
    items = params_lib.step_items(ocp.args.StandardSave(state), self._model_config, **extra)
    saved = self._manager.save(step, args=items, force=True)
    if saved:
      self._unconfirmed = step
    return saved

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, bytes | None]:
    """Restores onto the shardings in `abstract_state` (any mesh), plus this host's data position."""
    items = {params_lib.STATE: ocp.args.StandardRestore(abstract_state)}
    has_data = (self.directory / str(step) / DATA).exists()
    if has_data:
      items[DATA] = DataStateRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored[params_lib.STATE], (restored[DATA] if has_data else None)

  def wait(self):
    """Waits for the save in flight. A save that failed in orbax's background threads (which only log
    the error) raises here, so that a run never ends as if its last checkpoint were written."""
    self._manager.wait_until_finished()
    step, self._unconfirmed = self._unconfirmed, None
    if step is not None and not (self.directory / str(step) / params_lib.STATE).exists():
      raise IOError(f'The checkpoint of step {step} was not written to {self.directory} (see the '
                    'errors logged above); the previous complete checkpoint is intact.')

  def close(self):
    self._manager.close()


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


def params_from(path: str) -> Callable:
  """`init_params` for loop.train (config.init_from): the parameters of the checkpoint at `path`
  (a workdir, its checkpoints/ folder, a step folder, or an imported Hugging Face model), after
  checking that it holds the architecture the config describes."""
  def init_params(run):
    abstract = run.abstract_state().params
    saved = params_lib.load_model_config(path)
    different = [f'model.{f}: checkpoint {getattr(saved, f)!r}, config {getattr(run.model_config, f)!r}'
                 for f in ARCHITECTURE_FIELDS if getattr(saved, f) != getattr(run.model_config, f)]
    if different:
      try:
        params_lib.check_params_match(path, abstract)
        shapes = ''
      except ValueError as e:
        shapes = f'\n{e}'
      raise validate.ConfigError(f'config.init_from={path} was trained with a different model:\n  '
                                 + '\n  '.join(different) + shapes)
    logging.info('Initialising parameters from %s', params_lib.resolve_step_dir(path))
    return params_lib.load_params(path, abstract)
  return init_params

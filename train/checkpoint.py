"""Checkpoints: the train state plus each host's input-pipeline position, saved together by orbax.

Layout under `directory`: one folder per step: `<step>/state` (step, params, optimizer state),
`<step>/data` (one blob per host) and `<step>/model_config` (the ModelConfig as JSON, so that a step
folder alone is enough to rebuild the model). Orbax writes a step to a temporary folder and renames it
only when every host has finished, so an interrupted save never looks like a checkpoint.
"""

import contextlib
import dataclasses
import json
import logging as std_logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from model import ModelConfig
from train.metrics import is_remote


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


class Checkpointer:
  """Saves when asked (asynchronously by default) and keeps the last `keep` checkpoints.

  The caller decides when to save; orbax's own interval logic would also save the first step.
  """

  def __init__(self, directory: str, keep: int, async_save: bool = True,
               model_config: ModelConfig | None = None):
    self.directory = absolute(directory)
    self._unconfirmed: int | None = None  # the last step saved, until it is seen on storage
    self._model_config = model_config
    self.incomplete = report_incomplete(self.directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: bytes | None) -> bool:
    self.wait()  # orbax waits for the previous save anyway; this also checks that it was written
    items = {'state': ocp.args.StandardSave(state)}
    if data_state is not None:
      items['data'] = DataStateSave(data_state)
    if self._model_config is not None:
      items['model_config'] = ocp.args.JsonSave(dataclasses.asdict(self._model_config))
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    if saved:
      self._unconfirmed = step
    return saved

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, bytes | None]:
    """Restores onto the shardings in `abstract_state` (any mesh), plus this host's data position."""
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    has_data = (self.directory / str(step) / 'data').exists()
    if has_data:
      items['data'] = DataStateRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored['state'], (restored['data'] if has_data else None)

  def wait(self):
    """Waits for the save in flight. A save that failed in orbax's background threads (which only log
    the error) raises here, so that a run never ends as if its last checkpoint were written."""
    self._manager.wait_until_finished()
    step, self._unconfirmed = self._unconfirmed, None
    if step is not None and not (self.directory / str(step) / 'state').exists():
      raise IOError(f'The checkpoint of step {step} was not written to {self.directory} (see the '
                    'errors logged above); the previous complete checkpoint is intact.')

  def close(self):
    self._manager.close()


TMP_MARK = '.orbax-checkpoint-tmp'


def report_incomplete(directory: epath.Path) -> list[str]:
  """Names of step folders that an interrupted save left unfinished. They are never restored (orbax
  only lists finalized steps) and are removed here so that the step can be saved again."""
  if not directory.exists():
    return []
  names = sorted(p.name for p in directory.iterdir() if TMP_MARK in p.name)
  if names and jax.process_index() == 0:
    logging.warning('Found %d incomplete checkpoint(s) from an interrupted save in %s: %s. They are '
                    'ignored and removed; resuming from the latest complete checkpoint.', len(names),
                    directory, ', '.join(names))
    for name in names:
      (directory / name).rmtree()
  return names


def absolute(path: str) -> epath.Path:
  """Local paths made absolute (orbax refuses relative ones); gs:// and other URLs as they are."""
  return epath.Path(path if is_remote(path) else os.path.abspath(path))


def resolve_step_dir(path: str) -> epath.Path:
  """A step folder from a workdir (its latest step), a checkpoints folder, or a step folder itself."""
  p = absolute(path)
  if (p / 'state').exists():
    return p
  for root in (p / 'checkpoints', p):
    if root.exists():
      steps = sorted(int(c.name) for c in root.iterdir()
                     if c.name.isdigit() and (c / 'state').exists() and TMP_MARK not in c.name)
      if steps:
        return root / str(steps[-1])
  raise FileNotFoundError(f'No checkpoint at {path}: expected a workdir, its checkpoints/ folder, or '
                          'a step folder holding state/')


def load_model_config(path: str) -> ModelConfig:
  """The ModelConfig stored with a checkpoint (see module docstring)."""
  step_dir = resolve_step_dir(path)
  meta = step_dir / 'model_config' / 'metadata'
  if not meta.exists():
    raise FileNotFoundError(f'{step_dir} holds no model_config; it was not written by this project')
  return ModelConfig.from_dict(json.loads(meta.read_text()))


@contextlib.contextmanager
def _reading_one_item():
  """Orbax warns that a step's metadata file is missing when one item folder is read on its own (as
  here, to read only the parameters); the step folder does have it, so the warning is noise."""
  noise = lambda record: 'Metadata file does not exist' not in record.getMessage()
  logger = std_logging.getLogger('absl')
  logger.addFilter(noise)
  try:
    yield
  finally:
    logger.removeFilter(noise)


def check_params_match(path: str, abstract_params: Any):
  """Raises a ValueError naming the first parameter missing from, or shaped differently in, the
  checkpoint at `path`. Reads metadata only."""
  state_dir = resolve_step_dir(path) / 'state'
  with _reading_one_item():
    saved = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree['params']
  _check_same_shapes(saved, abstract_params, str(state_dir))


def load_params(path: str, abstract_params: Any) -> Any:
  """Restores only the parameters of a checkpoint onto the shapes and shardings of `abstract_params`.

  Raises a ValueError naming the first parameter whose shape differs, before reading any weights.
  """
  check_params_match(path, abstract_params)
  state_dir = resolve_step_dir(path) / 'state'
  with _reading_one_item():
    restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
        item={'params': abstract_params},
        restore_args={'params': ocp.checkpoint_utils.construct_restore_args(abstract_params)},
        partial_restore=True))
  return restored['params']


def _check_same_shapes(saved: Any, expected: Any, where: str):
  saved_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(saved)}
  for key, want in jax.tree_util.tree_leaves_with_path(expected):
    name = jax.tree_util.keystr(key)
    if name not in saved_flat:
      raise ValueError(f'{where}: parameter {name} is missing from the checkpoint '
                       f'(it has {len(saved_flat)} parameters, e.g. {sorted(saved_flat)[:3]})')
    have = tuple(saved_flat[name].shape)
    if have != tuple(want.shape):
      raise ValueError(f'{where}: parameter {name} has shape {have} in the checkpoint but the model '
                       f'expects {tuple(want.shape)}; check the model config against the checkpoint')

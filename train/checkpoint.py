"""Checkpoints: the train state plus each host's input-pipeline position, saved together by orbax.

Layout under `directory`: one folder per step (`<step>/state`, `<step>/data`). Orbax writes a step to a
temporary folder and renames it only when every host has finished, so an interrupted save never looks
like a checkpoint.
"""

import dataclasses
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


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

  def __init__(self, directory: str, keep: int, async_save: bool = True):
    self.directory = epath.Path(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: bytes | None) -> bool:
    items = {'state': ocp.args.StandardSave(state)}
    if data_state is not None:
      items['data'] = DataStateSave(data_state)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, bytes | None]:
    """Restores onto the shardings in `abstract_state` (any mesh), plus this host's data position."""
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    has_data = (self.directory / str(step) / 'data').exists()
    if has_data:
      items['data'] = DataStateRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored['state'], (restored['data'] if has_data else None)

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Restores only the parameters (e.g. to start fine-tuning from a pretraining run)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item={'params': abstract_params},
            restore_args={'params': ocp.checkpoint_utils.construct_restore_args(abstract_params)},
            partial_restore=True)))
    return restored['state']['params']

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()

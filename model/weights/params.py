"""A model's weights on disk: the step folder that holds its parameters and its ModelConfig.

A step folder `<checkpoints>/<step>/` holds `state/` (an orbax PyTree whose `params` subtree is the
model's parameters; training adds the step counter and optimizer state beside it, see
train/checkpoint.py) and `model_config/` (the ModelConfig as JSON), so that the folder alone rebuilds
the model, and `checksums.json` (model/weights/checksums.py). A LoRA step folder's `params` are only the
adapters; its `lora/` item (JSON) holds their LoraConfig and a pointer to the frozen base's own step
folder, with the base's fingerprint (model/weights/adapters.py). This module resolves such folders (from a
workdir, `WORKDIR:best`, its checkpoints/ folder, or the step folder itself), reads a step's model
config, loads its parameters with a shape check first and their checksums checked alongside, and
writes parameters-only step folders (Hugging Face imports). Local or gs:// paths (etils.epath).
"""

import concurrent.futures
import contextlib
import dataclasses
import json
import logging as std_logging
import os
from typing import Any, Callable, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from model import sharding
from model.config import DTYPES, ModelConfig
from model.lora import LoraConfig
from model.transformer import abstract_params
from model.weights import checksums

STATE, MODEL_CONFIG, LORA = 'state', 'model_config', 'lora'  # the items of a step folder
# `WORKDIR:best` names the step that a run's early stopping judged best (config.train.early_stopping):
# WORKDIR/BEST_RECORD holds {"step", "metric", "value", "mode"} (train/evaluation.py writes it).
BEST, BEST_RECORD = ':best', 'best_checkpoint.json'
# Orbax writes a step to `<step>.orbax-checkpoint-tmp-*` and renames it when complete; on object
# stores it writes the step folder in place and marks it complete with COMMIT_FILE.
TMP_MARK = '.orbax-checkpoint-tmp'
COMMIT_FILE = 'commit_success.txt'
T = TypeVar('T')


def is_remote(path) -> bool:
  """An object-store path (gs://...), where files cannot be appended to or renamed cheaply."""
  return '://' in str(path)


def absolute(path) -> epath.Path:
  """Local paths made absolute (orbax refuses relative ones); gs:// and other URLs as they are."""
  return epath.Path(path if is_remote(path) else os.path.abspath(path))


def saved_steps(directory) -> list[int]:
  """The complete steps under a checkpoints folder, oldest first."""
  directory = absolute(directory)
  if not directory.exists():
    return []
  remote = is_remote(directory)
  return sorted(int(c.name) for c in directory.iterdir()
                if c.name.isdigit() and (c / STATE).exists()
                and (not remote or (c / COMMIT_FILE).exists()))


def step_dirs(path) -> list[epath.Path]:
  """The complete step folders of a workdir or its checkpoints/ folder, oldest first; a step folder
  itself (holding state/) is its own list."""
  p = absolute(path)
  if (p / STATE).exists():
    return [p]
  for root in (p / 'checkpoints', p):
    steps = saved_steps(root)
    if steps:
      return [root / str(step) for step in steps]
  raise FileNotFoundError(f'No checkpoint at {path}: expected a workdir, its checkpoints/ folder, or '
                          'a step folder holding state/')


def resolve_step_dir(path) -> epath.Path:
  """A step folder from a workdir (its latest step), `WORKDIR:best` (its best step), a checkpoints
  folder, or a step folder itself."""
  if str(path).endswith(BEST):
    return best_step_dir(str(path)[:-len(BEST)])
  return step_dirs(path)[-1]


def intact_step_before(step_dir) -> epath.Path | None:
  """The newest step folder older than `step_dir` beside it that a quick check finds intact."""
  step_dir = absolute(step_dir)
  if not step_dir.name.isdigit():
    return None
  for step in reversed([s for s in saved_steps(step_dir.parent) if s < int(step_dir.name)]):
    if checksums.check(step_dir.parent / str(step), quick=True).status == 'ok':
      return step_dir.parent / str(step)
  return None


def damaged(step_dir, problems, advice: str = '') -> checksums.DamagedCheckpoint:
  """The error for a damaged step, naming the newest earlier step that looks intact."""
  return checksums.DamagedCheckpoint(step_dir, problems, intact_step_before(step_dir), advice)


def quick_check(step_dir):
  """Sizes and small files (metadata) against the manifest, before anything parses them."""
  report = checksums.check(step_dir, quick=True)
  if report.status == 'damaged':
    raise damaged(step_dir, report.problems)


def restore_verified(step_dir, restore: Callable[[], T], share: tuple[int, int] = (0, 1),
                     anywhere: Callable[[bool], bool] = lambda found: found) -> T:
  """`restore()`, while the step's checksums are checked in a parallel thread. A mismatch raises
  DamagedCheckpoint (naming the step, the file, and the newest earlier step that looks intact), in
  preference to whatever the restore raised. Hosts split the reading (`share` = (host, hosts)) and
  `anywhere(found)` tells whether any host found damage."""
  quick_check(step_dir)
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    checking = pool.submit(checksums.check, step_dir, share)
    try:
      restored = restore()
    except Exception:
      if checking.result().status == 'damaged':
        raise damaged(step_dir, checking.result().problems) from None
      raise
    report = checking.result()
  if anywhere(report.status == 'damaged'):
    raise damaged(step_dir, report.problems or ['another host found damaged files (see its log)'])
  if report.status == 'unverified':
    logging.warning('%s: restoring it unchecked', report.problems[0])
  return restored


def best_step_dir(workdir) -> epath.Path:
  """The step folder that WORKDIR/BEST_RECORD names."""
  record = absolute(workdir) / BEST_RECORD
  if not record.exists():
    raise FileNotFoundError(f'{workdir}{BEST}: {record} not found; a run writes it when '
                            'config.train.early_stopping.metric is set')
  best = json.loads(record.read_text())
  step_dir = absolute(workdir) / 'checkpoints' / str(best['step'])
  if best['step'] not in saved_steps(step_dir.parent):
    raise FileNotFoundError(f'{workdir}{BEST}: the best step, {best["step"]} ({best["metric"]} '
                            f'{best["value"]:.4g}), has no checkpoint at {step_dir}')
  return step_dir


def load_model_config(path) -> ModelConfig:
  """The ModelConfig stored with a checkpoint."""
  step_dir = resolve_step_dir(path)
  quick_check(step_dir)
  meta = step_dir / MODEL_CONFIG / 'metadata'
  if not meta.exists():
    raise FileNotFoundError(f'{step_dir} holds no model_config; it was not written by this project')
  return ModelConfig.from_dict(json.loads(meta.read_text()))


def load_base_pointer(path) -> dict | None:
  """The `lora` item of a step folder of LoRA adapters, pointing to their frozen base ({'config',
  'base', 'fingerprint'}: model/weights/adapters.py), or None for plain weights."""
  step_dir = resolve_step_dir(path)
  quick_check(step_dir)
  meta = step_dir / LORA / 'metadata'
  return json.loads(meta.read_text()) if meta.exists() else None


def abstract_params_on(cfg: ModelConfig, mesh=None, lora: LoraConfig = LoraConfig()):
  """The parameter tree (with `lora`'s adapters and base storage) as ShapeDtypeStructs placed on `mesh`
  by their logical axes (FSDP/tensor sharded as in training), or on the first device when `mesh` is
  None: a target for `load_params`."""
  shapes = abstract_params(cfg, lora=lora)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return sharding.placed(shapes, jax.tree.map(lambda _: device, shapes))
  return sharding.placed(shapes, sharding.tree_shardings(abstract_params(cfg, True, lora), mesh))


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


def check_params_match(path, expected: Any):
  """Raises a ValueError naming the first parameter missing from, or shaped differently in, the
  checkpoint at `path` (compared with the tree of arrays or ShapeDtypeStructs `expected`). Reads
  metadata only."""
  state_dir = resolve_step_dir(path) / STATE
  with _reading_one_item():
    saved = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree['params']
  saved_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(saved)}
  for key, want in jax.tree_util.tree_leaves_with_path(expected):
    name = jax.tree_util.keystr(key)
    if name not in saved_flat:
      raise ValueError(f'{state_dir}: parameter {name} is missing from the checkpoint '
                       f'(it has {len(saved_flat)} parameters, e.g. {sorted(saved_flat)[:3]})')
    have = tuple(saved_flat[name].shape)
    if have != tuple(want.shape):
      raise ValueError(f'{state_dir}: parameter {name} has shape {have} in the checkpoint but the model '
                       f'expects {tuple(want.shape)}; check the model config against the checkpoint')


def load_params(path, abstract: Any) -> Any:
  """Restores only the parameters of a checkpoint onto the shapes, dtypes and shardings of `abstract`
  (e.g. `abstract_params_on(cfg, mesh)`). Raises a ValueError naming the first parameter whose shape
  differs, before reading any weights, and a DamagedCheckpoint if the files fail their checksums."""
  return _restore_params(path, abstract, abstract,
                         ocp.checkpoint_utils.construct_restore_args(abstract))


def load_params_numpy(path, cfg: ModelConfig, dtype: str, expected: Any = None) -> dict:
  """A checkpoint's parameters as host numpy arrays, cast to `dtype` as they are read (no device and
  no second copy), after checking every shape against `cfg` (or the tree of shapes `expected`);
  checksums as in `load_params`."""
  expected = abstract_params(cfg) if expected is None else expected
  target = jax.tree.map(lambda s: np.empty((0,), DTYPES[dtype]), expected)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray, dtype=DTYPES[dtype]),
                              expected)
  return _restore_params(path, expected, target, restore_args)


def _restore_params(path, expected: Any, target: Any, restore_args: Any) -> Any:
  """The `params` subtree of a step's state, restored as `target` and `restore_args` say, after
  checking its shapes against `expected`, with the step's checksums checked alongside."""
  step_dir = resolve_step_dir(path)

  def restore():
    check_params_match(step_dir, expected)
    with _reading_one_item():
      return ocp.PyTreeCheckpointer().restore(step_dir / STATE, args=ocp.args.PyTreeRestore(
          item={'params': target}, restore_args={'params': restore_args}, partial_restore=True))
  return restore_verified(step_dir, restore)['params']


def step_items(state: ocp.args.CheckpointArgs, cfg: ModelConfig | None, **extra) -> ocp.args.Composite:
  """What a step folder holds, as orbax save arguments: `state` (the save of a tree with `params`;
  in training also the step counter and optimizer state), the model config (unless None), and `extra`
  items (train/checkpoint.py adds each host's input position)."""
  items = {STATE: state, **extra}
  if cfg is not None:
    items[MODEL_CONFIG] = ocp.args.JsonSave(dataclasses.asdict(cfg))
  return ocp.args.Composite(**items)


def save_params(directory, cfg: ModelConfig, params: dict, step: int = 0, lora: dict | None = None):
  """Writes `<directory>/<step>/` with state = {'params': params} (host numpy arrays, e.g. an imported
  Hugging Face model, or imported adapters with their `lora` reference), without the memory orbax
  would otherwise add: its default numpy handler deep-copies every array before writing, and OCDBT
  buffers all the written data until the end unless told to close data files at a target size."""
  registry = ocp.type_handlers.create_type_handler_registry(
      (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
      (jax.Array, ocp.type_handlers.ArrayHandler()))
  options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=False)
  handlers = {STATE: ocp.PyTreeCheckpointHandler(type_handler_registry=registry, save_concurrent_gb=1),
              MODEL_CONFIG: ocp.JsonCheckpointHandler(), LORA: ocp.JsonCheckpointHandler()}
  with ocp.CheckpointManager(absolute(directory), options=options, item_handlers=handlers) as manager:
    state = ocp.args.PyTreeSave({'params': params}, ocdbt_target_data_file_size=64 * 2**20)
    extra = {LORA: ocp.args.JsonSave(lora)} if lora else {}
    manager.save(step, args=step_items(state, cfg, **extra))
    manager.wait_until_finished()
  checksums.write_manifest(absolute(directory) / str(step))

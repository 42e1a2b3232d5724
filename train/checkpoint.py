"""Training checkpoints: the train state plus each host's input-pipeline position, saved by orbax.

A step folder (model/weights/params.py defines it) holds `state/` (step, params, optimizer state),
`model_config/`, `checksums.json`, and here also `data/` (one blob per host: its input pipeline's
position). Orbax writes a step to a temporary folder and renames it only when every host has
finished; the primary host checksums the finished files in orbax's background thread just before
that rename (model/weights/checksums.py), so an interrupted save never looks like a checkpoint and a committed
one always has its manifest. Restores check it. A LoRA run saves its adapters and their optimizer
state, never the frozen base: its `lora/` item refers to the base's own checkpoint (model/weights/adapters.py),
from which a resumed run reloads it. Also: the starting point of a fine-tuning run
(`config.init_from`): the model it defines (`model_config`) and its parameters, checked against the
config (`params_from`); and `python -m train.checkpoint verify DIR`.

  python -m train.checkpoint verify runs/tiny [runs/other ...]   # every step of these workdirs
  python -m train.checkpoint benchmark [--gib 1]                  # checksum speed on this machine
"""

import dataclasses
import hashlib
import json
import os
import tempfile
import time
import zlib
from typing import Any, Callable

import google_crc32c
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import flags, logging
from etils import epath
from jax.experimental import multihost_utils

from model import ModelConfig, abstract_params, count_params
from model.config import ARCHITECTURE_FIELDS, COMPUTE_FIELDS, PRESETS
from model.lora import LoraConfig
from model.weights import adapters as adapters_lib
from model.weights import checksums
from model.weights import hf
from model.weights import params as params_lib
import runtime
from train import validate

DATA = 'data'  # the item holding each host's input position
# Preference tuning with the reference model in the step (no LoRA): the item naming the checkpoint its
# frozen starting parameters came from and their fingerprint, so that a resumed run reloads them.
REFERENCE = 'reference'


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
    self.lora_reference: dict | None = None  # LoRA: the base the adapters train on, saved with them
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
    if self.lora_reference is not None:
      extra[params_lib.LORA] = ocp.args.JsonSave(self.lora_reference)
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

  def lora_reference_of(self, step: int) -> dict | None:
    return params_lib.load_lora_reference(self.directory / str(step))

  def reference_of(self, step: int) -> dict:
    meta = self.directory / str(step) / REFERENCE / 'metadata'
    if not meta.exists():
      raise validate.ConfigError(f'{self.directory}/{step} does not say where its reference model came '
                                 'from (it was not written by a preference-tuning run)')
    return json.loads(meta.read_text())

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
  reference model (they refer to them)."""
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


# `model.preset` value saying that the model is config.init_from's, whatever config.model's other
# architecture fields say.
FROM_INIT = 'init_from'


def model_config(config: Any) -> ModelConfig:
  """The ModelConfig a run trains: `config.model`, or, when `config.init_from` is set and either
  `model.preset` is 'init_from' or config.model's architecture fields are those of the preset it
  names (none was changed), the init_from checkpoint's model (architecture and max_seq_len) computed
  as config.model says (its COMPUTE_FIELDS: dtypes, compilation, remat, attention). So that a
  fine-tuning config serves any imported model; architecture fields set on purpose are checked
  against the checkpoint by `params_from`."""
  model = config.model
  own = ModelConfig.from_dict(model)
  preset = model.get('preset')
  if preset == FROM_INIT and not config.get('init_from'):
    raise validate.ConfigError(f"model.preset={FROM_INIT!r} takes the model from config.init_from, "
                               'which is empty; set --config.init_from=CHECKPOINT')
  given = preset != FROM_INIT and (preset not in PRESETS or any(
      getattr(own, f) != getattr(ModelConfig(**PRESETS[preset]), f) for f in ARCHITECTURE_FIELDS))
  if not config.get('init_from') or given:
    return own
  saved = init_from_config(config.init_from)
  name, diff = hf.matching_preset(saved)
  logging.info('Model from config.init_from=%s (%s), computed in %s with %s parameters',
               config.init_from, f'preset {name!r}' if name else diff, own.dtype, own.param_dtype)
  return dataclasses.replace(saved, **{f: getattr(own, f) for f in COMPUTE_FIELDS})


def init_from_config(path) -> ModelConfig:
  """The ModelConfig of the checkpoint `config.init_from` names, its errors naming that key."""
  try:
    return params_lib.load_model_config(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'config.init_from: {e}') from None


@dataclasses.dataclass
class Start:
  """Where a fresh run starts: its trainable parameters (None: a random init), with LoRA the frozen
  base and the reference to it that every checkpoint of the run keeps, and for preference tuning with
  the reference model in the state, the REFERENCE item of those starting parameters."""
  params: Any = None
  frozen: Any = None
  base: dict | None = None
  reference: dict | None = None


def load_reference(item: dict, run, where: str):
  """The starting parameters a preference run's REFERENCE `item` names, checked against its
  fingerprint."""
  params = params_lib.load_params(item['path'], run.abstract_state().params)
  differ = adapters_lib.differing(adapters_lib.fingerprint(params), item['fingerprint'])
  if differ:
    raise validate.ConfigError(
        f'{where}: its reference model is the checkpoint at {item["path"]}, which now holds different '
        f'weights ({len(differ)} parameter(s) differ, e.g. {differ[:3]}); the preference loss would '
        'compare against another model. Restore that checkpoint, or start a new run.')
  return params


def params_from(path: str) -> Callable:
  """`init_params` for loop.train (config.init_from): returns the Start of a run from the checkpoint
  at `path` (a workdir, its checkpoints/ folder, a step folder, or an imported Hugging Face model),
  after checking that it holds the architecture the config describes. With LoRA, `path` is the base
  model, or a LoRA checkpoint whose adapters go on training (over the base it refers to). The folder
  is found, and its sizes and metadata checked, at once: before the run loads its data."""
  saved = init_from_config(path)
  ref = params_lib.load_lora_reference(path)

  def init_params(run) -> Start:
    different = [f'model.{f}: checkpoint {getattr(saved, f)!r}, config {getattr(run.model_config, f)!r}'
                 for f in ARCHITECTURE_FIELDS if getattr(saved, f) != getattr(run.model_config, f)]
    if different:
      try:
        params_lib.check_params_match(path, run.abstract_state().params if ref else
                                      abstract_params(run.model_config))
        shapes = ''
      except ValueError as e:
        shapes = f'\n{e}'
      raise validate.ConfigError(f'config.init_from={path} was trained with a different model:\n  '
                                 + '\n  '.join(different) + shapes)
    if not run.lora.enabled:
      if ref is not None:
        raise validate.ConfigError(
            f'config.init_from={path} holds LoRA adapters over {ref["base"]}, not a whole model: set '
            f'config.lora to their settings ({ref["config"]}) to go on training them, or start from '
            'merged weights (python -m model.convert export, then import)')
      logging.info('Initialising parameters from %s', params_lib.resolve_step_dir(path))
      params = params_lib.load_params(path, run.abstract_state().params)
      reference = ({'path': str(params_lib.resolve_step_dir(path)),
                    'fingerprint': adapters_lib.fingerprint(params)} if run.reference_in_state else None)
      return Start(params, reference=reference)
    base = path if ref is None else ref['base']
    if ref is not None:
      _check_same_adapters(LoraConfig.from_dict(ref['config']), run.lora, path)
    logging.info('Loading the frozen base model from %s (%s)', params_lib.resolve_step_dir(base),
                 run.lora.base_dtype or run.model_config.param_dtype)
    frozen, prints = adapters_lib.load_base(base, run.model_config, run.lora, run.mesh)
    params = None
    if ref is not None:
      try:
        adapters_lib.check_base(ref, prints, f'config.init_from={path}')
      except ValueError as e:
        raise validate.ConfigError(str(e)) from None
      logging.info('Initialising the adapters from %s', params_lib.resolve_step_dir(path))
      params = params_lib.load_params(path, run.abstract_state().params)
    return Start(params, frozen, adapters_lib.reference(base, prints, run.lora))
  return init_params


def _check_same_adapters(saved: LoraConfig, config: LoraConfig, path):
  """Adapters trained further must keep their shape and scale (dropout and base storage may change)."""
  different = [f'lora.{k}: checkpoint {getattr(saved, k)!r}, config {getattr(config, k)!r}'
               for k in ('rank', 'alpha', 'targets', 'rslora') if getattr(saved, k) != getattr(config, k)]
  if different:
    raise validate.ConfigError(f'config.init_from={path} holds adapters of other settings:\n  '
                               + '\n  '.join(different))


# --------------------------------------------------------------------------------------------------
# Command line

def verify_paths(paths) -> bool:
  """Checks every step of each path against its checksums, one line per step, and the base model
  that LoRA steps refer to (they are nothing without it). Returns whether no step is damaged (steps
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
    ref = params_lib.load_lora_reference(step_dir)
    if ref is not None:
      todo.append((epath.Path(ref['base']), f' (the base model of {step_dir})'))
  return intact


def _rate(fn, data: bytes, repeat: int = 2) -> float:
  """Seconds per GiB of `fn` over `data`, in 8 MiB pieces as a checkpoint is read."""
  pieces = [data[i:i + (8 << 20)] for i in range(0, len(data), 8 << 20)]
  start = time.perf_counter()
  for _ in range(repeat):
    for piece in pieces:
      fn(piece)
  return (time.perf_counter() - start) / repeat / (len(data) / 2**30)


def benchmark_checksums(gib: float, folder: str) -> list[str]:
  """Lines of figures: checksum candidates in memory, then the manifest written and checked on a
  file of `gib` GiB (read from the page cache), and what that means for a 7B training checkpoint."""
  sample = np.random.default_rng(0).integers(0, 256, 256 << 20, np.uint8).tobytes()
  candidates = {'crc32c (google-crc32c, used)': google_crc32c.value,
                'zlib.crc32': zlib.crc32,
                **{f'hashlib.{name}': (lambda name: lambda b: hashlib.new(name, b).digest())(name)
                   for name in ('md5', 'sha1', 'sha256', 'blake2b')}}
  try:
    import crc32c  # pylint: disable=import-outside-toplevel
    candidates['crc32c (the crc32c package)'] = crc32c.crc32c
  except ImportError:
    pass
  try:
    import xxhash  # pylint: disable=import-outside-toplevel
    candidates['xxh3_64 (xxhash)'] = xxhash.xxh3_64_digest
  except ImportError:
    pass
  lines = [f'{os.cpu_count()} CPU cores; in memory, one thread, 8 MiB pieces:']
  lines += [f'  {name:30s} {_rate(fn, sample):.3f} s/GiB' for name, fn in candidates.items()]
  with tempfile.TemporaryDirectory(dir=folder) as tmp:
    step = epath.Path(tmp) / '0'
    (step / 'state').mkdir(parents=True)
    with open(step / 'state' / 'data', 'wb') as f:
      for _ in range(max(1, round(gib * 4))):
        f.write(sample)
    size = (step / 'state' / 'data').stat().length / 2**30
    start = time.perf_counter()
    checksums.write_manifest(step)
    write_s = (time.perf_counter() - start) / size
    start = time.perf_counter()
    if checksums.check(step).status != 'ok':
      raise RuntimeError(f'{step} failed its own checksums while being timed')
    check_s = (time.perf_counter() - start) / size
  lines.append(f'A {size:.2f} GiB file from the page cache, {checksums.WORKERS} threads: manifest '
               f'written at {write_s:.3f} s/GiB, checked at {check_s:.3f} s/GiB')
  params = count_params(ModelConfig(**PRESETS['llama2_7b']))
  state_gib = params * 12 / 2**30  # float32 parameters and both Adam moments
  lines.append(f'llama2_7b ({params / 1e9:.2f}B parameters): a training checkpoint (float32 parameters '
               f'+ Adam moments, {state_gib:.0f} GiB) takes {state_gib * write_s:.0f} s to checksum on '
               f'this machine (in the background), plus reading it from storage; its bfloat16 '
               f'parameters alone ({params * 2 / 2**30:.1f} GiB) {params * 2 / 2**30 * check_s:.0f} s')
  return lines


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
  for line in benchmark_checksums(FLAGS.gib, FLAGS.dir or tempfile.gettempdir()):
    print(line, flush=True)
  return 0


def define_flags():
  flags.DEFINE_float('gib', 1.0, 'benchmark: size of the file to checksum, in GiB.', lower_bound=0.25)
  flags.DEFINE_string('dir', '', 'benchmark: folder for that file (default: the temporary folder).')


if __name__ == '__main__':
  define_flags()
  runtime.run(main)

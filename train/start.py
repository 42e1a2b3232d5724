"""Where a run starts, decided once: fresh, resumed from its workdir, or from `config.init_from`.

Everything a run reads of checkpoints is read here (the mechanics are model/weights/'s, and the
restore of a step train/checkpoint.py's):
  model_config(config)          the model a run trains: config.model, or init_from's (train/run.py's
                                Run reads it when it is built)
  resolve(run, config, workdir) called once, after the Run is built: a `Start`, one of
    RESUME     the workdir's newest step: train state and each host's data position as saved (a
               damaged step is refused, or with checkpoint.fall_back_to_intact set aside for the
               newest intact one); with LoRA the frozen base its `lora` item points to, with the
               reference model in the state the parameters its `reference` item names, both
               checked against the fingerprints saved with them
    INIT_FROM  no checkpoint yet: init_from's parameters, checked against the config, and a fresh
               optimizer; with LoRA init_from is the frozen base (or LoRA adapters, which go on
               training over the base they point to)
    FRESH      neither: random parameters
  starting_model(run, config, start)  the parameters the run started from (the preference reference
                                model of train/reference_pass.py): the start's, or, once resumed,
                                init_from's read again

The Trainer (train/loop.py) takes the Start as it is and never reads a checkpoint itself; it writes
them (train/checkpoint.py's Checkpointer), saving with every step the pointers the Start carries.
"""

import dataclasses
import json
from typing import Any

from absl import logging

from model import ModelConfig, abstract_params
from model import lora as lora_lib
from model.config import ARCHITECTURE_FIELDS, COMPUTE_FIELDS, PRESETS
from model.lora import LoraConfig
from model.weights import adapters as adapters_lib
from model.weights import checksums
from model.weights import hf
from model.weights import params as params_lib
from train import checkpoint as checkpoint_lib
from train import validate

FRESH, INIT_FROM, RESUME = 'fresh', 'init_from', 'resume'
# `model.preset` value saying that the model is config.init_from's, whatever config.model's other
# architecture fields say.
FROM_INIT = 'init_from'


@dataclasses.dataclass
class Start:
  """Where a run starts (see the module docstring for the three kinds)."""
  kind: str  # FRESH, INIT_FROM or RESUME
  state: Any  # the TrainState the first step steps from, placed on the Run's mesh
  step: int = 0  # the step `state` is at: RESUME's restored step (after any fall-back), else 0
  data_state: bytes | None = None  # RESUME: this host's input position (None: the step holds none)
  # LoRA: the `lora` item pointing to the frozen base (model/weights/adapters.py), which every
  # checkpoint of the run saves with its adapters.
  base: dict | None = None
  # The reference model in the state (preference tuning with dpo.reference='step', no LoRA): the
  # REFERENCE item naming the starting parameters' checkpoint and fingerprint, saved with every step.
  reference: dict | None = None
  # LoRA, INIT_FROM: whether the adapters were read from init_from (else B = 0: the model is the base).
  adapters_from_init: bool = False


def latest_step(workdir: str) -> int | None:
  """The newest complete checkpoint step of `workdir` (None: nothing to resume)."""
  return (params_lib.saved_steps(checkpoint_lib.folder(workdir)) or [None])[-1]


def resolve(run, config: Any, workdir: str) -> Start:
  """The Start of a run of `config` on `run` (a train/run.py Run) in `workdir`: resumed if the
  workdir holds a checkpoint, else from config.init_from if set, else fresh."""
  step = latest_step(workdir)
  if step is not None:
    return _resume(run, config, checkpoint_lib.folder(workdir), step)
  if config.get('init_from'):
    return load_init_from(run, config.init_from)
  if run.lora.enabled:
    raise validate.ConfigError(f'lora.rank={run.lora.rank} trains adapters over a frozen base '
                               'model: set config.init_from to it (a checkpoint or an imported '
                               'Hugging Face model)')
  if run.reference_in_state:
    raise validate.ConfigError('preference tuning with the reference model in the step starts from '
                               'the model to align: set config.init_from to it')
  return Start(FRESH, run.init_state())


# -- the model a run trains --------------------------------------------------------------------------

def model_config(config: Any) -> ModelConfig:
  """The ModelConfig a run trains: `config.model`, or, when `config.init_from` is set and either
  `model.preset` is 'init_from' or config.model's architecture fields are those of the preset it
  names (none was changed), the init_from checkpoint's model (architecture and max_seq_len) computed
  as config.model says (its COMPUTE_FIELDS: dtypes, compilation, remat, attention). So that a
  fine-tuning config serves any imported model; architecture fields set on purpose are checked
  against the checkpoint when its parameters are loaded."""
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


# -- RESUME ------------------------------------------------------------------------------------------

def _resume(run, config: Any, directory: str, step: int) -> Start:
  """The workdir's newest step (or the newest intact one), with the models its items point to."""
  ckpt = checkpoint_lib.Checkpointer(directory, config.checkpoint.keep)  # to read; the run opens its own
  try:
    step, state, data_state = _restore(ckpt, step, run, config)
  finally:
    ckpt.close()
  step_dir, where = ckpt.directory / str(step), f'{ckpt.directory}/{step}'
  base = reference = None
  if run.lora.enabled:
    base = params_lib.load_base_pointer(step_dir)
    if base is None:
      raise validate.ConfigError(f'{where} holds no LoRA adapters, but config.lora.rank={run.lora.rank}')
    state = state.replace(frozen=adapters_lib.load_checked_base(base, run.model_config, run.lora,
                                                                run.mesh, where))
  if run.reference_in_state:
    meta = step_dir / checkpoint_lib.REFERENCE / 'metadata'
    if not meta.exists():
      raise validate.ConfigError(f'{where} does not say where its reference model came from (it was '
                                 'not written by a preference-tuning run)')
    reference = json.loads(meta.read_text())
    state = state.replace(reference=load_reference(reference, run, where))
  logging.info('Resumed from %s at step %d', ckpt.directory, step)
  return Start(RESUME, state, step, data_state, base, reference)


def _restore(ckpt, step: int, run, config: Any):
  """(step, state, data position) of checkpoint `step`; if it is damaged and
  checkpoint.fall_back_to_intact is set, of the newest earlier step that is intact (the damaged
  ones are set aside as `<step>.damaged`)."""
  while True:
    try:
      return (step, *ckpt.restore(step, run.abstract_state()))
    except checksums.DamagedCheckpoint as e:
      if e.fallback is None:
        raise checksums.DamagedCheckpoint(e.step_dir, e.problems, None, advice=(
            f'Start again in a new --workdir, or delete {ckpt.directory} to train from '
            'scratch here.')) from None
      if not config.checkpoint.fall_back_to_intact:
        raise checksums.DamagedCheckpoint(e.step_dir, e.problems, e.fallback, advice=(
            'To resume from it, run again with --config.checkpoint.fall_back_to_intact=True (the '
            f'damaged step is kept as {step}.damaged and the steps after {e.fallback.name} are '
            'trained again).')) from None
      kept_as = ckpt.set_aside(step)
      logging.warning('%s Kept as %s; resuming from step %s (checkpoint.fall_back_to_intact).', e,
                      kept_as, e.fallback.name)
      step = int(e.fallback.name)


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


# -- INIT_FROM ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Loaded:
  """init_from's parameters as read: the trainable ones (None: adapters from scratch), with LoRA the
  frozen base and the pointer to it, for the reference model in the state its REFERENCE item."""
  params: Any = None
  frozen: Any = None
  base: dict | None = None
  reference: dict | None = None


def load_init_from(run, path) -> Start:
  """The INIT_FROM Start of `run` from the checkpoint at `path` (a workdir, its checkpoints/ folder, a
  step folder, or an imported Hugging Face model), after checking that it holds the architecture the
  config describes. With LoRA, `path` is the base model, or a LoRA checkpoint whose adapters go on
  training (over the base it points to)."""
  loaded = _read_init_from(run, path)
  # The REFERENCE fingerprint was taken before: the new state takes over (donates) these arrays.
  state = run.init_state(loaded.params, loaded.frozen)
  return Start(INIT_FROM, state, base=loaded.base, reference=loaded.reference,
               adapters_from_init=run.lora.enabled and loaded.params is not None)


def _read_init_from(run, path) -> _Loaded:
  saved = init_from_config(path)
  pointer = params_lib.load_base_pointer(path)
  different = [f'model.{f}: checkpoint {getattr(saved, f)!r}, config {getattr(run.model_config, f)!r}'
               for f in ARCHITECTURE_FIELDS if getattr(saved, f) != getattr(run.model_config, f)]
  if different:
    try:
      params_lib.check_params_match(path, run.abstract_state().params if pointer else
                                    abstract_params(run.model_config))
      shapes = ''
    except ValueError as e:
      shapes = f'\n{e}'
    raise validate.ConfigError(f'config.init_from={path} was trained with a different model:\n  '
                               + '\n  '.join(different) + shapes)
  if not run.lora.enabled:
    if pointer is not None:
      raise validate.ConfigError(
          f'config.init_from={path} holds LoRA adapters over {pointer["base"]}, not a whole model: set '
          f'config.lora to their settings ({pointer["config"]}) to go on training them, or start from '
          'merged weights (python -m model.convert export, then import)')
    logging.info('Initialising parameters from %s', params_lib.resolve_step_dir(path))
    params = params_lib.load_params(path, run.abstract_state().params)
    reference = ({'path': str(params_lib.resolve_step_dir(path)),
                  'fingerprint': adapters_lib.fingerprint(params)} if run.reference_in_state else None)
    return _Loaded(params, reference=reference)
  if pointer is not None and run.reference_in_step:
    raise validate.ConfigError(
        f'config.init_from={path} holds LoRA adapters; with dpo.reference=step the reference is the '
        'base alone, not that starting model: set config.dpo.reference=precompute (the reference is '
        'then the base with those adapters), or merge them into the base first')
  base = path if pointer is None else pointer['base']
  if pointer is not None:
    _check_same_adapters(LoraConfig.from_dict(pointer['config']), run.lora, path)
  logging.info('Loading the frozen base model from %s (%s)', params_lib.resolve_step_dir(base),
               run.lora.base_dtype or run.model_config.param_dtype)
  frozen, prints = adapters_lib.load_base(base, run.model_config, run.lora, run.mesh)
  params = None
  if pointer is not None:
    try:
      adapters_lib.check_base(pointer, prints, f'config.init_from={path}')
    except ValueError as e:
      raise validate.ConfigError(str(e)) from None
    logging.info('Initialising the adapters from %s', params_lib.resolve_step_dir(path))
    params = params_lib.load_params(path, run.abstract_state().params)
  return _Loaded(params, frozen, adapters_lib.base_pointer(base, prints, run.lora))


def _check_same_adapters(saved: LoraConfig, config: LoraConfig, path):
  """Adapters trained further must keep their shape and scale (dropout and base storage may change)."""
  different = [f'lora.{k}: checkpoint {getattr(saved, k)!r}, config {getattr(config, k)!r}'
               for k in ('rank', 'alpha', 'targets', 'rslora') if getattr(saved, k) != getattr(config, k)]
  if different:
    raise validate.ConfigError(f'config.init_from={path} holds adapters of other settings:\n  '
                               + '\n  '.join(different))


# -- the model a run started from --------------------------------------------------------------------

def starting_model(run, config: Any, start: Start) -> tuple[Any, bool]:
  """(parameters, whether they hold LoRA adapters) of the model the run started from, the reference
  model of preference tuning: the whole model's parameters; with LoRA the base alone, or the base
  joined with the adapters init_from held (for `run.reference_step(with_adapters)`). A resumed run's
  state has moved on: init_from is read again."""
  if start.kind == RESUME:
    loaded = _read_init_from(run, config.init_from)
    params, frozen = loaded.params, loaded.frozen
  else:
    params, frozen = start.state.params, start.state.frozen
    if run.lora.enabled and not start.adapters_from_init:
      params = None
  if not run.lora.enabled:
    return params, False
  if params is None:
    return frozen, False
  return lora_lib.join(frozen, params), True

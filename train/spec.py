"""The run spec: a config file's ml_collections ConfigDict, converted once into frozen sections.

The user surface stays the config file (`get_config()`) and `--config.a.b=v` overrides. The trainers
convert that ConfigDict once, at their entry point (`Spec.of`), into one frozen dataclass per section
(`train`, `optimizer`, `checkpoint`, `eval`, `dpo`, `grpo`, `mesh`, `logging`, `distributed`; `lora` is
model/lora.py's LoraConfig, `model` the ConfigDict of a preset and its overrides, resolved against
`init_from` by train/start.py; `data` stays the ConfigDict that data/ reads). Each component receives
its own section. What a key means lives beside it, as field metadata:
  - its check (`positive`, `at_least(0)`, `one_of(...)`), run when the section is made, so a bad value
    fails before anything is computed, naming the key and what was expected;
  - whether a resumed run may change it (`resume=True`: how long to train and how often to log,
    evaluate and save; everything else changes the run itself, see train/workdir.py `check_config`).
Checks between sections that need only the config are in `Spec.problems`; those that need the model
and the devices in train/validate.py `check`. All problems found are reported at once.

configs/default.py builds the defaults from these sections, so that a key, its default, its check and
its comment are written once.
"""

import dataclasses
import difflib
from typing import Any, Callable, ClassVar, Mapping

import ml_collections

from model.lora import LoraConfig


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key and what was expected."""


# --------------------------------------------------------------------------------------------------
# Checks, as field metadata

Check = tuple[Callable[[Any], bool], str]  # (predicate, what is expected, e.g. 'positive')

positive: Check = (lambda v: v > 0, 'positive')


def at_least(low) -> Check:
  return (lambda v: v >= low, f'>= {low}')


def between(low, high) -> Check:
  return (lambda v: low <= v <= high, f'in [{low}, {high}]')


def one_of(*values) -> Check:
  return (lambda v: v in values, f'one of {values}')


def setting(default, check: Check | None = None, resume: bool = False, hint: str = ''):
  """A field of a section: its default, its check (with a `hint` after the value in its message), and
  whether a resumed run may change it."""
  return dataclasses.field(default=default, metadata={'check': check, 'resume': resume, 'hint': hint})


def section(cls, resume: bool = False):
  """A nested section as a field of its parent (all its keys may change on resume with `resume`)."""
  return dataclasses.field(default_factory=cls, metadata={'check': None, 'resume': resume})


@dataclasses.dataclass(frozen=True)
class Section:
  """A frozen section of the spec; `problems()` lists what is wrong with its values."""
  NAME: ClassVar[str] = ''

  def problems(self, prefix: str = '') -> list[str]:
    prefix = prefix or self.NAME
    errors = []
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if isinstance(value, Section):
        errors += value.problems(f'{prefix}.{f.name}')
      elif f.metadata.get('check') and not f.metadata['check'][0](value):
        shown = repr(value) if isinstance(value, str) else value
        hint = f' ({f.metadata["hint"]})' if f.metadata.get('hint') else ''
        errors.append(f'{prefix}.{f.name} must be {f.metadata["check"][1]}, got {shown}{hint}')
    return errors

  @classmethod
  def from_config(cls, values: Mapping[str, Any] | None, prefix: str = ''):
    """The section of a ConfigDict (missing keys take their defaults; an unknown key is an error
    naming it, with the closest known key)."""
    prefix = prefix or cls.NAME
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
      key = unknown[0]
      close = difflib.get_close_matches(key, fields, n=1)
      raise ConfigError(f'config.{prefix}.{key} is not a setting'
                        + (f': did you mean config.{prefix}.{close[0]}?' if close else
                           f'; config.{prefix} has {sorted(fields)}'))
    kwargs = {}
    for name, value in values.items():
      default = fields[name].default_factory() if fields[name].default is dataclasses.MISSING else (
          fields[name].default)
      if isinstance(default, Section):
        value = type(default).from_config(value, f'{prefix}.{name}')
      elif isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
      kwargs[name] = value
    return cls(**kwargs)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  # Read like the ConfigDict it came from, for code that takes either (`mesh['fsdp']`, `.get`).
  def __getitem__(self, key: str):
    return getattr(self, key)

  def get(self, key: str, default=None):
    return getattr(self, key, default)

  def keys(self):
    return [f.name for f in dataclasses.fields(self)]


def resumable_keys(cls, prefix: str) -> list[str]:
  """The dotted keys (a trailing '.' for a whole section) of `cls` that a resumed run may change."""
  keys = []
  for f in dataclasses.fields(cls):
    name = f'{prefix}.{f.name}'
    nested = f.default_factory() if f.default is dataclasses.MISSING else None
    if f.metadata.get('resume'):
      keys.append(name + '.' if isinstance(nested, Section) else name)
    elif isinstance(nested, Section):
      keys += resumable_keys(type(nested), name)
  return keys


# --------------------------------------------------------------------------------------------------
# The sections

OBJECTIVES = ('lm', 'dpo', 'grpo')
PREFERENCE_LOSSES = ('sigmoid', 'robust', 'ipo', 'simpo')
DPO_REFERENCES = ('precompute', 'step')


@dataclasses.dataclass(frozen=True)
class EarlyStopping(Section):
  """Stop when an evaluated value stops improving, and keep its best checkpoint (train/evaluation.py).

  metric: '' (off), eval_loss, eval_perplexity or eval_<task metric of eval.generation>; mode: ''
  (min for loss and perplexity, max for task metrics), min or max; patience: evaluations without a new
  best before stopping (0: never stop, only keep the best); min_delta: how much better a new best must
  be.
  """
  NAME: ClassVar[str] = 'train.early_stopping'
  metric: str = setting('')
  mode: str = setting('', one_of('', 'min', 'max'))
  patience: int = setting(3, at_least(0))
  min_delta: float = setting(0.0, at_least(0))


@dataclasses.dataclass(frozen=True)
class Train(Section):
  NAME: ClassVar[str] = 'train'
  steps: int = setting(1000, positive, resume=True)
  batch_size: int = setting(32, positive)          # global batch, in sequences (rows of seq_len tokens)
  seq_len: int = setting(256, positive)
  grad_accum_steps: int = setting(1, positive)     # microbatches per step; batch_size must divide evenly
  z_loss: float = setting(0.0, at_least(0))        # weight of the log(Z)^2 auxiliary loss (PaLM: 1e-4)
  seed: int = setting(0)
  log_every: int = setting(10, positive, resume=True)
  eval_every: int = setting(200, at_least(0), resume=True)  # 0: only at the end
  eval_at_start: bool = setting(True, resume=True)          # held-out loss before the first update
  eval_max_batches: int = setting(20, at_least(0), resume=True)  # per evaluation, per host
  # Stop after this many steps in a row with a non-finite loss or gradient.
  max_consecutive_skips: int = setting(10, at_least(0), resume=True)
  override_workdir_config: bool = setting(False, resume=True)  # resume even if the run used another config
  take_over_lock: bool = setting(False, resume=True)  # run even if the workdir's lock names another run
  # The loss computes float32 logits for this many positions at a time (0: the whole sequence at
  # once); for a 128k vocabulary the logits are the largest activation of the step.
  loss_chunk_len: int = setting(1024, at_least(0))
  # 'lm': next-token cross-entropy on the targets with loss weight (pretraining, instruction tuning);
  # 'dpo': a preference loss over pairs (train.dpo, the `dpo` section); 'grpo': a policy-gradient loss
  # on completions sampled from the model being trained (train.grpo, the `grpo` section).
  objective: str = setting('lm', one_of(*OBJECTIVES))
  early_stopping: EarlyStopping = section(EarlyStopping, resume=True)


@dataclasses.dataclass(frozen=True)
class Optimizer(Section):
  """AdamW with linear warmup and cosine decay to min_lr_ratio * lr (train/optimizer.py)."""
  NAME: ClassVar[str] = 'optimizer'
  lr: float = setting(3e-4, positive, hint='at 0 the run would train nothing')
  warmup_steps: int = setting(100, at_least(0))
  decay_steps: int = setting(0, at_least(0))  # 0: decay until train.steps
  min_lr_ratio: float = setting(0.1, between(0, 1))
  b1: float = setting(0.9)
  b2: float = setting(0.95)
  eps: float = setting(1e-8)
  weight_decay: float = setting(0.1)
  grad_clip: float = setting(1.0)
  state_dtype: str = setting('')  # dtype of Adam's moments ('' = the parameters'; 'bfloat16' halves them)


@dataclasses.dataclass(frozen=True)
class Checkpoint(Section):
  """fall_back_to_intact: resume from the newest intact checkpoint when the latest fails its checksums
  (the damaged one is kept as <step>.damaged); False stops with a message naming both."""
  NAME: ClassVar[str] = 'checkpoint'
  every_steps: int = setting(500, positive)
  keep: int = setting(3, positive)
  async_save: bool = setting(True)
  fall_back_to_intact: bool = setting(False)


@dataclasses.dataclass(frozen=True)
class Generation(Section):
  """Task metrics of generated answers during tuning (train/evaluation.py): greedy answers to the first
  num_prompts held-out conversations, every every_steps steps (0: with each held-out loss evaluation),
  scored by `metrics` (comma-separated: exact_match, exact_match_strict, f1, rouge1, rouge2, rougeL,
  bleu, chrf; '' for none)."""
  NAME: ClassVar[str] = 'eval.generation'
  metrics: str = setting('')
  num_prompts: int = setting(100, positive)
  every_steps: int = setting(0, at_least(0))
  max_new_tokens: int = setting(32, positive)
  batch_size: int = setting(32, positive)


@dataclasses.dataclass(frozen=True)
class Eval(Section):
  NAME: ClassVar[str] = 'eval'
  generation: Generation = section(Generation)


@dataclasses.dataclass(frozen=True)
class Dpo(Section):
  """Preference tuning (train.dpo, train.objective='dpo'; train/step.py `Preference`).

  loss: sigmoid (DPO; with label_smoothing conservative DPO), robust, ipo, simpo (reference-free, with
  simpo_gamma); sft_weight > 0 adds that times the chosen answers' mean negative log-likelihood (RPO);
  reference: where the frozen reference model's log-probabilities come from, 'precompute' (one pass
  over the data before training, kept in the workdir) or 'step' (computed in every step; the
  full-model case holds a second copy of the weights). docs/benchmarks.md compares them.
  """
  NAME: ClassVar[str] = 'dpo'
  loss: str = setting('sigmoid', one_of(*PREFERENCE_LOSSES))
  beta: float = setting(0.1, positive)
  label_smoothing: float = setting(0.0, (lambda v: 0 <= v < 0.5, 'in [0, 0.5)'))
  simpo_gamma: float = setting(0.5)
  sft_weight: float = setting(0.0, at_least(0))
  reference: str = setting('precompute', one_of(*DPO_REFERENCES))


@dataclasses.dataclass(frozen=True)
class Grpo(Section):
  """Reinforcement learning from rewards (train.grpo, train.objective='grpo'; train/policy_gradient.py).

  Every step samples `num_generations` completions of each of train.batch_size / num_generations
  prompts from the model being trained (train.batch_size counts completions, as TRL's batch does),
  scores them with `rewards` (train/rewards.py: built-ins or module:function, comma-separated, with
  `reward_weights`; `reward_column` is the record column the built-ins compare with), turns the
  rewards into advantages within each prompt's group (`advantages`: grpo z-score, dr_grpo mean only,
  rloo leave-one-out) and takes `num_iterations` steps on them, each with the clipped surrogate loss
  (`epsilon_low`, `epsilon_high`), beta times the KL divergence from the frozen starting model (0: no
  reference at all), aggregated by `loss_type` (dapo: the mean over all completion tokens; grpo: per
  completion, then over completions; dr_grpo: over completions x max_completion_len). Sampling:
  `temperature`, `top_k`, `top_p`, at most `max_completion_len` tokens, stopping at the chat
  template's end of turn; prompts longer than `max_prompt_len` tokens are dropped and counted.
  """
  NAME: ClassVar[str] = 'grpo'
  num_generations: int = setting(8, (lambda v: v >= 2, '>= 2 (advantages compare completions)'))
  max_prompt_len: int = setting(128, positive)
  max_completion_len: int = setting(64, positive)
  temperature: float = setting(1.0, positive)
  top_k: int = setting(0, at_least(0))
  top_p: float = setting(1.0, (lambda v: 0 < v <= 1, 'in (0, 1]'))
  rewards: str = setting('exact_match')
  reward_weights: str = setting('')
  reward_column: str = setting('reference')
  advantages: str = setting('grpo', one_of('grpo', 'dr_grpo', 'rloo'))
  loss_type: str = setting('dapo', one_of('grpo', 'dapo', 'bnpo', 'dr_grpo'))
  epsilon_low: float = setting(0.2, at_least(0))
  epsilon_high: float = setting(0.2, at_least(0))
  beta: float = setting(0.0, at_least(0))
  num_iterations: int = setting(1, positive)


@dataclasses.dataclass(frozen=True)
class Mesh(Section):
  """Device mesh: sizes of the data / fsdp / tensor axes; -1 takes whatever devices remain."""
  NAME: ClassVar[str] = 'mesh'
  data: int = setting(1)
  fsdp: int = setting(-1)
  tensor: int = setting(1)


@dataclasses.dataclass(frozen=True)
class Logging(Section):
  """Metrics always go to <workdir>/metrics.jsonl and TensorBoard; set a project to also use W&B."""
  NAME: ClassVar[str] = 'logging'
  wandb_project: str = setting('')
  wandb_entity: str = setting('')


@dataclasses.dataclass(frozen=True)
class Distributed(Section):
  """Multi-process runs outside TPU VMs / SLURM: the coordinator's host:port, and this process's
  place; initialization_timeout_s: how long every process waits for the others to join."""
  NAME: ClassVar[str] = 'distributed'
  coordinator_address: str = setting('')
  num_processes: int = setting(0)
  process_id: int = setting(-1)
  initialization_timeout_s: int = setting(300, positive)


# Sections a resumed run may change as a whole, and the single keys outside sections.
RESUMABLE_SECTIONS = ('eval', 'checkpoint', 'mesh', 'distributed', 'logging')
RESUMABLE_KEYS = ('init_from',)


@dataclasses.dataclass(frozen=True)
class Spec:
  """A whole run's settings, frozen; built by `Spec.of(config)` at the entry point."""
  SECTIONS: ClassVar[dict[str, type]] = {
      'train': Train, 'optimizer': Optimizer, 'checkpoint': Checkpoint, 'eval': Eval, 'dpo': Dpo,
      'grpo': Grpo, 'mesh': Mesh, 'logging': Logging, 'distributed': Distributed}

  train: Train
  optimizer: Optimizer
  checkpoint: Checkpoint
  eval: Eval
  dpo: Dpo
  grpo: Grpo
  mesh: Mesh
  logging: Logging
  distributed: Distributed
  lora: LoraConfig
  model: ml_collections.ConfigDict  # a preset and its overrides, resolved by train/start.py
  data: ml_collections.ConfigDict   # data/config.py's section, read by data/ (locked: no new keys)
  init_from: str
  config: ml_collections.ConfigDict  # what the user gave, as config.json records it

  @classmethod
  def of(cls, config, check: bool = True) -> 'Spec':
    """The spec of a ConfigDict (a Spec is returned as it is). Raises ConfigError for an unknown key,
    and, with `check`, listing every problem that the config alone shows (train/validate.py `check`
    adds those of the model and the devices)."""
    if isinstance(config, Spec):
      return config
    known = set(cls.SECTIONS) | {'lora', 'model', 'data', 'init_from'}
    unknown = sorted(set(config.keys()) - known)
    if unknown:
      close = difflib.get_close_matches(unknown[0], known, n=1)
      raise ConfigError(f'config.{unknown[0]} is not a section'
                        + (f': did you mean config.{close[0]}?' if close else f'; known: {sorted(known)}'))
    sections = {name: section_cls.from_config(config.get(name)) for name, section_cls in
                cls.SECTIONS.items()}
    try:
      lora = LoraConfig.from_dict(config.get('lora'))
    except ValueError as e:
      raise ConfigError(str(e)) from None
    config = ml_collections.ConfigDict(config)  # the spec's own copy: later changes do not reach it
    config.lock()
    spec = cls(**sections, lora=lora, model=config.get('model', ml_collections.ConfigDict()),
               data=config.get('data', ml_collections.ConfigDict()),
               init_from=str(config.get('init_from', '') or ''), config=config)
    if check:
      raise_problems(spec.problems())
    return spec

  def get(self, key: str, default=None):
    return getattr(self, key, default)

  def to_json_best_effort(self, **kwargs) -> str:
    """The config as the user gave it (config.json)."""
    return self.config.to_json_best_effort(**kwargs)

  def problems(self) -> list[str]:
    """Every problem of the sections' values, and between sections, that the config alone shows."""
    errors = []
    for name in self.SECTIONS:
      if name in ('dpo', 'grpo') and self.train.objective != name:
        continue  # an objective's section matters to that objective only
      errors += getattr(self, name).problems()
    if self.train.objective == 'dpo':
      if self.train.z_loss:
        errors.append(f'train.z_loss ({self.train.z_loss}) applies to the language-modeling objective '
                      'only; set it to 0 for preference tuning')
      if self.data.get('format') not in ('preference', 'synthetic'):
        errors.append(f'train.objective=dpo trains on preference pairs: data.format must be '
                      f'"preference", got {self.data.get("format")!r}')
    if self.train.objective == 'grpo':
      grpo, train = self.grpo, self.train
      if train.z_loss:
        errors.append(f'train.z_loss ({train.z_loss}) applies to the language-modeling objective only; '
                      'set it to 0 for train.grpo')
      if grpo.num_generations >= 2 and train.batch_size % grpo.num_generations:
        errors.append(f'train.batch_size ({train.batch_size}) counts completions: it must be a '
                      f'multiple of grpo.num_generations ({grpo.num_generations})')
      if train.seq_len < grpo.max_prompt_len + grpo.max_completion_len:
        errors.append(f'train.seq_len ({train.seq_len}) must hold a prompt and its completion: at '
                      f'least grpo.max_prompt_len + grpo.max_completion_len = '
                      f'{grpo.max_prompt_len + grpo.max_completion_len}')
    return errors

  @classmethod
  def resumable_keys(cls) -> tuple[str, ...]:
    """The dotted keys (a trailing '.' for a whole section) that a resumed run may change."""
    keys = [f'{name}.' for name in RESUMABLE_SECTIONS] + list(RESUMABLE_KEYS)
    for name, section_cls in cls.SECTIONS.items():
      if name not in RESUMABLE_SECTIONS:
        keys += resumable_keys(section_cls, name)
    return tuple(keys)


def raise_problems(errors: list[str]):
  if errors:
    raise ConfigError('Invalid config: ' + (errors[0] if len(errors) == 1 else
                                            '\n  ' + '\n  '.join(errors)))


def default_sections() -> dict[str, ml_collections.ConfigDict]:
  """Every section's defaults as ConfigDicts, for configs/default.py."""
  return {name: ml_collections.ConfigDict(section_cls().to_dict())
          for name, section_cls in Spec.SECTIONS.items()}

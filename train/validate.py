"""Checks a config against the model, the devices and the tokenizer before anything is computed.

Every problem found is reported at once, each naming the config key and what was expected.
"""

from typing import Any

from model import ModelConfig, abstract_params
from model import lora as lora_lib
from model import sharding as sharding_lib
from model.lora import LoraConfig
from train.step import PREFERENCE_LOSSES

class ConfigError(ValueError):
  pass


def lora_config(config: Any) -> LoraConfig:
  """`config.lora` as a LoraConfig (off for configs without the section)."""
  try:
    return LoraConfig.from_dict(config.get('lora'))
  except ValueError as e:
    raise ConfigError(str(e)) from None


OBJECTIVES = ('lm', 'dpo')
DPO_REFERENCES = ('precompute', 'step')


def objective(config: Any) -> str:
  """`config.train.objective` ('lm' for configs without the key)."""
  return config.train.get('objective', 'lm')


def _preference_problems(config: Any) -> list[str]:
  dpo, errors = config.dpo, []
  if dpo.loss not in PREFERENCE_LOSSES:
    errors.append(f'dpo.loss must be one of {PREFERENCE_LOSSES}, got {dpo.loss!r}')
  if dpo.beta <= 0:
    errors.append(f'dpo.beta must be positive, got {dpo.beta}')
  if not 0 <= dpo.label_smoothing < 0.5:
    errors.append(f'dpo.label_smoothing must be in [0, 0.5), got {dpo.label_smoothing}')
  if dpo.sft_weight < 0:
    errors.append(f'dpo.sft_weight must be >= 0, got {dpo.sft_weight}')
  if dpo.reference not in DPO_REFERENCES:
    errors.append(f'dpo.reference must be one of {DPO_REFERENCES}, got {dpo.reference!r}')
  if config.train.z_loss:
    errors.append(f'train.z_loss ({config.train.z_loss}) applies to the language-modeling objective '
                  'only; set it to 0 for preference tuning')
  if config.data.format not in ('preference', 'synthetic'):
    errors.append(f'train.objective=dpo trains on preference pairs: data.format must be "preference", '
                  f'got {config.data.format!r}')
  return errors


def check(config: Any, model: ModelConfig, num_devices: int, tokenizer_vocab: int | None = None,
          lora: LoraConfig = LoraConfig()):
  errors = lora_lib.problems(lora, abstract_params(model)) if lora.enabled else []
  train, opt, mesh = config.train, config.optimizer, config.mesh
  if objective(config) not in OBJECTIVES:
    errors.append(f'train.objective must be one of {OBJECTIVES}, got {objective(config)!r}')
  elif objective(config) == 'dpo':
    errors += _preference_problems(config)

  for key in ('steps', 'batch_size', 'seq_len', 'grad_accum_steps', 'log_every'):
    if train[key] <= 0:
      errors.append(f'train.{key} must be positive, got {train[key]}')
  for key in ('eval_every', 'eval_max_batches', 'loss_chunk_len'):
    if train[key] < 0:
      errors.append(f'train.{key} must be >= 0, got {train[key]}')
  generation, stopping = config.eval.generation, train.early_stopping
  for key in ('num_prompts', 'max_new_tokens', 'batch_size'):
    if generation[key] <= 0:
      errors.append(f'eval.generation.{key} must be positive, got {generation[key]}')
  if generation.every_steps < 0:
    errors.append(f'eval.generation.every_steps must be >= 0, got {generation.every_steps}')
  if stopping.mode not in ('', 'min', 'max'):
    errors.append(f"train.early_stopping.mode must be '', 'min' or 'max', got {stopping.mode!r}")
  if stopping.patience < 0 or stopping.min_delta < 0:
    errors.append(f'train.early_stopping.patience and min_delta must be >= 0, got {stopping.patience} '
                  f'and {stopping.min_delta}')
  if config.checkpoint.every_steps <= 0 or config.checkpoint.keep <= 0:
    errors.append(f'checkpoint.every_steps and checkpoint.keep must be positive, got '
                  f'{config.checkpoint.every_steps} and {config.checkpoint.keep}')
  if opt.lr <= 0:
    errors.append(f'optimizer.lr must be positive, got {opt.lr} (at 0 the run would train nothing)')
  if opt.warmup_steps < 0 or opt.decay_steps < 0:
    errors.append(f'optimizer.warmup_steps and decay_steps must be >= 0, got '
                  f'{opt.warmup_steps}, {opt.decay_steps}')
  if not 0 <= opt.min_lr_ratio <= 1:
    errors.append(f'optimizer.min_lr_ratio must be in [0, 1], got {opt.min_lr_ratio}')

  try:
    data, fsdp, tensor = sharding_lib.mesh_shape(mesh, num_devices)
  except ValueError as e:
    errors.append(str(e))
    data = fsdp = tensor = None

  if data is not None and train.batch_size > 0 and train.grad_accum_steps > 0:
    shards = data * fsdp
    if train.batch_size % train.grad_accum_steps:
      errors.append(f'train.batch_size ({train.batch_size}) must be divisible by '
                    f'train.grad_accum_steps ({train.grad_accum_steps})')
    elif (train.batch_size // train.grad_accum_steps) % shards:
      errors.append(f'each microbatch (train.batch_size / train.grad_accum_steps = '
                    f'{train.batch_size // train.grad_accum_steps}) must be divisible by the '
                    f'{shards} batch shards (mesh.data * mesh.fsdp = {data} * {fsdp})')
  if tensor:
    for key in ('n_heads', 'n_kv_heads', 'mlp_dim', 'vocab_size'):
      if getattr(model, key) % tensor:
        errors.append(f'model.{key} ({getattr(model, key)}) must be divisible by the tensor-parallel '
                      f'axis (mesh.tensor = {tensor})')

  if train.seq_len > model.max_seq_len:
    errors.append(f'train.seq_len ({train.seq_len}) exceeds model.max_seq_len ({model.max_seq_len}), '
                  'the longest sequence the rope settings are meant for; raise model.max_seq_len '
                  '(and rope scaling) deliberately if you mean it')
  if tokenizer_vocab is not None and tokenizer_vocab > model.vocab_size:
    errors.append(f'the tokenizer has {tokenizer_vocab} tokens but model.vocab_size is '
                  f'{model.vocab_size}; token ids would fall outside the embedding table')
  if errors:
    raise ConfigError('Invalid config: ' + (errors[0] if len(errors) == 1 else
                                            '\n  ' + '\n  '.join(errors)))

"""Checks a config against the model, the devices and the tokenizer before anything is computed.

Every problem found is reported at once, each naming the config key and what was expected: the values'
own checks and those between sections come from train/spec.py, those of the mesh, the batch, the model
and the tokenizer are here.
"""

from typing import Any

from model import ModelConfig, abstract_params
from model import lora as lora_lib
from model import sharding as sharding_lib
from model.lora import LoraConfig
from train.spec import ConfigError, Spec, raise_problems  # pylint: disable=unused-import  (ConfigError: this module's error)

def lora_config(config: Any) -> LoraConfig:
  """`config.lora` as a LoraConfig (off for configs without the section)."""
  if isinstance(config, Spec):
    return config.lora
  try:
    return LoraConfig.from_dict(config.get('lora'))
  except ValueError as e:
    raise ConfigError(str(e)) from None


def objective(config: Any) -> str:
  """`config.train.objective` ('lm' for configs without the key)."""
  return config.train.objective if isinstance(config, Spec) else config.train.get('objective', 'lm')


def check(config: Any, model: ModelConfig, num_devices: int, tokenizer_vocab: int | None = None,
          lora: LoraConfig = LoraConfig()):
  """Raises ConfigError listing every problem of `config` (a ConfigDict or its Spec): its values
  (train/spec.py), and how they fit `model`, the devices and the tokenizer."""
  spec = Spec.of(config, check=False)
  errors = spec.problems()
  errors += lora_lib.problems(lora, abstract_params(model)) if lora.enabled else []
  train, mesh = spec.train, spec.mesh
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
  raise_problems(errors)

"""What the tests build again and again, in one place: the micro model, the configs the trainers take
with it, and the same settings as command-line flags.

The micro model is 64 wide: 2 layers of 4 query heads of 16 sharing 2 key/value heads, an MLP of 128,
a 512-token vocabulary (the demo tokenizer's of conftest.py). It compiles and steps in seconds on CPU,
and every width divides by the 8 fake devices, so it shards as a real model does. A module whose
recorded numbers depend on its exact model passes that model's settings as overrides; the defaults
here never change (they would change those numbers).
"""

import json
import os

import ml_collections

from configs import default, sft_tiny, tiny
from model import ModelConfig

MICRO = dict(vocab_size=512, embed_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=128)
# A short run's train settings (run_config): 8 sequences a step, every step logged, one held-out
# evaluation of 2 batches at the end.
SHORT_RUN = dict(batch_size=8, log_every=1, eval_every=0, eval_at_start=False, eval_max_batches=2)
BASES = {'default': default, 'tiny': tiny, 'sft_tiny': sft_tiny}


def micro_model_config(**overrides) -> ModelConfig:
  """The micro model as a ModelConfig, computing in float32 on up to 128 positions, with overrides."""
  return ModelConfig(**{**MICRO, 'dtype': 'float32', 'max_seq_len': 128, **overrides})


def run_config(base: str = 'default', model: dict | None = None, **sections) -> ml_collections.ConfigDict:
  """configs/<base>.py's config (default, tiny or sft_tiny) training the micro model (with `model`'s
  overrides) for a short run (SHORT_RUN), then each section's overrides: a dict updates that section
  (`train=dict(steps=4)`, `data=dict(format='synthetic')`), any other value replaces the key
  (`init_from=workdir`)."""
  c = BASES[base].get_config()
  c.model.update({**MICRO, **(model or {})})
  c.train.update(SHORT_RUN)
  for name, values in sections.items():
    if isinstance(values, dict):
      c[name].update(values)
    else:
      c[name] = values
  return c


def micro_flags(**overrides) -> list[str]:
  """The micro model (with overrides) as the flags of a training command: `--config.model.<field>=`."""
  return [f'--config.model.{k}={v}' for k, v in {**MICRO, **overrides}.items()]


def losses(workdir) -> dict:
  """step -> training loss, from a run's metrics.jsonl; where a step was logged twice (redone after
  a resume), the later value counts."""
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return {r['step']: r['loss'] for r in map(json.loads, f) if 'loss' in r}

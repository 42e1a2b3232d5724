"""Model hyperparameters: one frozen dataclass, plus the published shapes we ship."""

import dataclasses
from typing import Any, Mapping

import jax
import ml_dtypes
import numpy as np

from model import attention, remat

# Names of the floating-point dtypes a config may use, and their numpy types (host arrays, safetensors).
DTYPES = {'float32': np.dtype(np.float32), 'bfloat16': np.dtype(ml_dtypes.bfloat16),
          'float16': np.dtype(np.float16)}


def _architecture(default):
  """A field that fixes the weights' shapes or the function they compute: a checkpoint, a preset and a
  config must agree on it to mean the same model."""
  return dataclasses.field(default=default, metadata={'kind': 'architecture'})


def _compute(default):
  """A field that says how to compute the model, not what it is: a training config sets it for
  whichever checkpoint it trains."""
  return dataclasses.field(default=default, metadata={'kind': 'compute'})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a LLaMA-family decoder.

  Field names follow the logical axes they size: `embed_dim` is the `embed` axis, `mlp_dim` the `mlp`
  axis, and so on.
  """
  vocab_size: int = _architecture(32000)
  embed_dim: int = _architecture(4096)
  n_layers: int = _architecture(32)
  n_heads: int = _architecture(32)
  n_kv_heads: int = _architecture(32)
  head_dim: int = _architecture(128)
  mlp_dim: int = _architecture(11008)
  norm_eps: float = _architecture(1e-5)
  # Rotary embeddings. `rope_scaling_factor` > 0 turns on Llama-3.1 frequency scaling.
  rope_theta: float = _architecture(10000.0)
  rope_scaling_factor: float = _architecture(0.0)
  rope_low_freq_factor: float = _architecture(1.0)
  rope_high_freq_factor: float = _architecture(4.0)
  rope_original_max_len: int = _architecture(8192)
  # Longest sequence the model is meant to see; used to validate `seq_len`, not to size any weight.
  max_seq_len: int = 4096
  qkv_bias: bool = _architecture(False)
  # Qwen3: RMSNorm over each query and key head (a `head_dim` scale each) before the rotary embedding.
  qk_norm: bool = _architecture(False)
  tie_embeddings: bool = _architecture(False)
  init_std: float = 0.02
  # Numerics: parameters are stored in `param_dtype`, matmuls run in `dtype`.
  dtype: str = _compute('bfloat16')
  param_dtype: str = _compute('float32')
  # Compilation: scan over layers (constant compile time in depth) and what to rematerialise.
  scan_layers: bool = _compute(True)
  remat_policy: str = _compute('none')
  attention: str = _compute('auto')

  def __post_init__(self):
    errors = []
    for name in ('vocab_size', 'embed_dim', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim', 'mlp_dim',
                 'max_seq_len'):
      if getattr(self, name) <= 0:
        errors.append(f'model.{name} must be positive, got {getattr(self, name)}')
    if self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads:
      errors.append(f'model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads '
                    f'({self.n_kv_heads}) for grouped-query attention')
    if self.head_dim % 2:
      errors.append(f'model.head_dim must be even for rotary embeddings, got {self.head_dim}')
    for name in ('dtype', 'param_dtype'):
      if getattr(self, name) not in DTYPES:
        errors.append(f'model.{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}')
    if self.remat_policy not in remat.POLICIES:
      errors.append(f'model.remat_policy must be one of {list(remat.POLICIES)}, got {self.remat_policy!r}')
    if self.attention not in attention.NAMES:
      errors.append(f'model.attention must be one of {list(attention.NAMES)}, got {self.attention!r}')
    if errors:
      raise ValueError('Invalid model config:\n  ' + '\n  '.join(errors))

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> 'ModelConfig':
    """Builds a config from a mapping (e.g. an ml_collections ConfigDict), rejecting unknown keys."""
    values = dict(values)
    values.pop('preset', None)  # informational: which preset the values came from
    for name in RETIRED_FIELDS:  # still in the model_config of checkpoints written before they moved
      values.pop(name, None)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f'Unknown model config key(s) {unknown}; expected a subset of {sorted(known)}')
    return cls(**values)


# The fields by kind (their metadata above). `max_seq_len` and `init_std` are neither: they describe
# the model, and a checkpoint's own values stay with it.
ARCHITECTURE_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig)
                            if f.metadata.get('kind') == 'architecture')
COMPUTE_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.metadata.get('kind') == 'compute')
# Fields that moved out of ModelConfig (`loss_chunk_len` is now train.loss_chunk_len).
RETIRED_FIELDS = ('loss_chunk_len',)


# Published shapes. Parameter counts are checked in tests/test_model.py.
PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized, for tests and the demo. Two 64-wide query heads sharing one key/value head: the same
    # parameter count as four 32-wide heads, and 8% faster training steps on CPU (fewer, larger
    # [T, S] score matrices; docs/benchmarks.md).
    'tiny': dict(vocab_size=2048, embed_dim=128, n_layers=4, n_heads=2, n_kv_heads=1, head_dim=64,
                 mlp_dim=384, max_seq_len=1024, dtype='float32'),
    # CPU-sized too, wider: the matmuls of a real model at a size a laptop trains in minutes.
    'small': dict(vocab_size=8192, embed_dim=512, n_layers=6, n_heads=8, n_kv_heads=4, head_dim=64,
                  mlp_dim=1536, max_seq_len=2048, dtype='float32'),
    # Llama 3.2 1B and 3B: tied embeddings, Llama-3.1 rope scaling by 32. 1B is the single-GPU
    # benchmark model.
    'llama3_2_1b': dict(vocab_size=128256, embed_dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                        head_dim=64, mlp_dim=8192, norm_eps=1e-5, rope_theta=500000.0,
                        rope_scaling_factor=32.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                        rope_original_max_len=8192, max_seq_len=131072, tie_embeddings=True),
    'llama3_2_3b': dict(vocab_size=128256, embed_dim=3072, n_layers=28, n_heads=24, n_kv_heads=8,
                        head_dim=128, mlp_dim=8192, norm_eps=1e-5, rope_theta=500000.0,
                        rope_scaling_factor=32.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                        rope_original_max_len=8192, max_seq_len=131072, tie_embeddings=True),
    'llama2_7b': dict(vocab_size=32000, embed_dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                      head_dim=128, mlp_dim=11008, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096),
    'llama3_8b': dict(vocab_size=128256, embed_dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                      head_dim=128, mlp_dim=14336, norm_eps=1e-5, rope_theta=500000.0,
                      max_seq_len=8192),
    # Llama 3.1 8B: same weights' shapes as 3.0, with rope scaling for 128k context.
    'llama3_1_8b': dict(vocab_size=128256, embed_dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                        head_dim=128, mlp_dim=14336, norm_eps=1e-5, rope_theta=500000.0,
                        rope_scaling_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                        rope_original_max_len=8192, max_seq_len=131072),
    # Mistral 7B v0.2/v0.3 style: full attention (no sliding window), rope theta 1e6.
    'mistral_7b': dict(vocab_size=32000, embed_dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                       head_dim=128, mlp_dim=14336, norm_eps=1e-5, rope_theta=1000000.0,
                       max_seq_len=32768),
    # Qwen2 7B: biases on q, k and v; a 152k vocabulary, untied.
    'qwen2_7b': dict(vocab_size=152064, embed_dim=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                     head_dim=128, mlp_dim=18944, norm_eps=1e-6, rope_theta=1000000.0,
                     max_seq_len=32768, qkv_bias=True),
    # Qwen3 dense: q/k RMSNorm, no biases, 128-wide heads whatever the width (0.6B: 16 x 128 = 2048
    # query features from a 1024-wide stream); tied embeddings up to 4B.
    'qwen3_0_6b': dict(vocab_size=151936, embed_dim=1024, n_layers=28, n_heads=16, n_kv_heads=8,
                       head_dim=128, mlp_dim=3072, norm_eps=1e-6, rope_theta=1000000.0,
                       max_seq_len=40960, qk_norm=True, tie_embeddings=True),
    'qwen3_8b': dict(vocab_size=151936, embed_dim=4096, n_layers=36, n_heads=32, n_kv_heads=8,
                     head_dim=128, mlp_dim=12288, norm_eps=1e-6, rope_theta=1000000.0,
                     max_seq_len=40960, qk_norm=True),
}


def preset(name: str, **overrides) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f'Unknown model preset {name!r}; known: {sorted(PRESETS)}')
  return ModelConfig(**{**PRESETS[name], **overrides})


def compute_dtype(name: str | None = None) -> str:
  """`name`, or this machine's default compute dtype for running a model: float32 on CPU (the numbers
  a float32 reference computes; a CPU has no faster bfloat16 matmuls), bfloat16 on accelerators."""
  return name or ('float32' if jax.default_backend() == 'cpu' else 'bfloat16')

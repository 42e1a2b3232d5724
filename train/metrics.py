"""Throughput accounting (model FLOPs, peak rates of known chips) and the metric writers."""

import json
import os
import time

import jax

from model import ModelConfig

# Dense bf16 peak TFLOP/s per chip, by a substring of `jax.Device.device_kind` (first match wins).
PEAK_TFLOPS = (
    ('TPU v6 lite', 918.0),  # v6e (Trillium)
    ('TPU v6e', 918.0),
    ('TPU v5 lite', 197.0),  # v5e
    ('TPU v5e', 197.0),
    ('TPU v5p', 459.0),
    ('TPU v5', 459.0),  # v5p reports itself as "TPU v5"
    ('TPU v4', 275.0),
    ('H200', 989.0),
    ('H100', 989.0),
    ('A100', 312.0),
)


def peak_tflops(device: jax.Device | None = None) -> float | None:
  """The chip's peak bf16 TFLOP/s, or None where unknown (e.g. CPU)."""
  kind = (device or jax.devices()[0]).device_kind
  for pattern, tflops in PEAK_TFLOPS:
    if pattern.lower() in kind.lower():
      return tflops
  return None


def matmul_params(cfg: ModelConfig) -> int:
  """Parameters that take part in a matmul per token (the embedding lookup is not a matmul)."""
  per_layer = (cfg.embed_dim * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
               + cfg.n_heads * cfg.head_dim * cfg.embed_dim
               + 3 * cfg.embed_dim * cfg.mlp_dim)
  return cfg.n_layers * per_layer + cfg.embed_dim * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token as MaxText counts them: 6 per matmul weight (forward + backward) plus
  causal self-attention (two [T, T] matmuls per head, half of them masked, times 3 for backward).
  """
  attention = 6 * seq_len * cfg.n_heads * cfg.head_dim * cfg.n_layers
  return 6 * matmul_params(cfg) + attention


class MetricWriter:
  """Writes scalars to TensorBoard event files and to `metrics.jsonl`, from the primary host only."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
    try:
      import tensorboardX  # pylint: disable=import-outside-toplevel
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))
    except ImportError:
      self._tb = None  # The GPU benchmark image has no tensorboardX; metrics.jsonl still has it all.

  def write(self, step: int, scalars: dict[str, float]):
    if not self.enabled:
      return
    record = {'step': int(step), 'time': time.time(), **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, float(v), int(step))
      self._tb.flush()

  def close(self):
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()

"""Training metrics: model FLOPs per token, the log line, and the writers (metrics.jsonl, TensorBoard,
Weights & Biases)."""

import json
import os
import time

from absl import logging
from etils import epath

from model import ModelConfig
from model.weights.params import is_remote

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


def format_line(step: int, total: int, m: dict[str, float]) -> str:
  """The training log's line for one logging window."""
  parts = [f'step {step}/{total}', f"loss {m['loss']:.4f}", f"lr {m['learning_rate']:.2e}",
           f"grad_norm {m['grad_norm']:.3f}"]
  if 'rewards/accuracies' in m:
    parts += [f"reward accuracy {100 * m['rewards/accuracies']:.1f}%",
              f"margin {m['rewards/margins']:.3f}"]
  if 'step_time_ms' in m:
    parts += [f"tokens/s {m['tokens_per_sec']:,.0f}", f"step {m['step_time_ms']:.1f} ms",
              f"{m['tflops_per_device']:.2f} TFLOP/s/device"]
  if 'mfu' in m:
    parts.append(f"MFU {100 * m['mfu']:.1f}%")
  if m.get('skipped'):
    parts.append(f"skipped {int(m['skipped'])}")
  if 'step_time_ms' in m and step < total:
    eta = int((total - step) * m['step_time_ms'] / 1000)
    parts.append(f'ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}')
  return ' | '.join(parts)


class JsonlLog:
  """One JSON record per line. Appended to locally; on object stores, where appending is impossible,
  the whole file is rewritten at most every `rewrite_every_s` seconds and on close."""

  def __init__(self, path: str, rewrite_every_s: float = 60.0):
    self.path = epath.Path(path)
    self._remote = is_remote(path)
    self._rewrite_every_s = rewrite_every_s
    if self._remote:
      self._lines = ([line + '\n' for line in self.path.read_text().split('\n') if line]
                     if self.path.exists() else [])
      self._written_at = time.monotonic()
    else:
      self._file = open(path, 'a', encoding='utf-8')

  def append(self, record: dict):
    line = json.dumps(record) + '\n'
    if not self._remote:
      self._file.write(line)
      self._file.flush()
      return
    self._lines.append(line)
    if time.monotonic() - self._written_at >= self._rewrite_every_s:
      self.flush()

  def flush(self):
    if self._remote:
      self.path.write_text(''.join(self._lines))
      self._written_at = time.monotonic()

  def close(self):
    if self._remote:
      self.flush()
    else:
      self._file.close()


class MetricWriter:
  """Writes scalars to TensorBoard event files and to `metrics.jsonl`, from the primary host only;
  also to Weights & Biases when `wandb_project` is set (the run resumes with the workdir). The
  workdir may be local or on an object store (gs://)."""

  def __init__(self, workdir: str, enabled: bool = True, wandb_project: str = '',
               wandb_entity: str = '', run_config: dict | None = None):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    self._wandb = None
    if not enabled:
      return
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    self._jsonl = JsonlLog(os.path.join(workdir, 'metrics.jsonl'))
    self._tb = _tensorboard_writer(os.path.join(workdir, 'tensorboard'))
    if wandb_project:
      try:
        self._wandb = _start_wandb(workdir, wandb_project, wandb_entity, run_config)
      except BaseException:
        self.close()  # else metrics.jsonl stays open and, on Python 3.12, tensorboardX's exit hook fails
        raise

  def write(self, step: int, scalars: dict[str, float]):
    if not self.enabled:
      return
    self._jsonl.append({'step': int(step), 'time': time.time(),
                        **{k: float(v) for k, v in scalars.items()}})
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, float(v), int(step))
      self._tb.flush()
    if self._wandb is not None:
      self._wandb.log({k: float(v) for k, v in scalars.items()}, step=int(step))

  def close(self):
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()


def _tensorboard_writer(logdir: str):
  try:
    import tensorboardX  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None  # The GPU benchmark image has no tensorboardX; metrics.jsonl still has it all.
  try:
    return tensorboardX.SummaryWriter(logdir)
  except Exception as e:  # pylint: disable=broad-exception-caught
    logging.warning('No TensorBoard events for %s (%s); metrics.jsonl still has every scalar. For gs:// '
                    'workdirs tensorboardX needs `pip install google-cloud-storage`.', logdir, e)
    return None


def _start_wandb(workdir: str, project: str, entity: str, run_config: dict | None):
  try:
    import wandb  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError(f'config.logging.wandb_project is {project!r} but the wandb package is not '
                      'installed: `pip install wandb`, or leave config.logging.wandb_project empty') from None
  # One W&B run per workdir: a resumed training run continues the same W&B run.
  id_file = epath.Path(workdir) / 'wandb_run_id.txt'
  if id_file.exists():
    run_id = id_file.read_text().strip()
  else:
    run_id = wandb.util.generate_id()
    id_file.write_text(run_id)
  # W&B keeps its own files on local disk; the workdir may be remote.
  local_dir = None if is_remote(workdir) else workdir
  return wandb.init(project=project, entity=entity or None, id=run_id, resume='allow', dir=local_dir,
                    config=run_config, name=os.path.basename(str(workdir).rstrip('/')))

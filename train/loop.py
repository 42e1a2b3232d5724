"""The training loop shared by `train.pretrain` and `train.sft`.

config -> mesh -> state (fresh, from `init_params`, or resumed from the workdir) -> jitted step over the
host's batches -> periodic eval, logs and checkpoints. The data source is the only thing that differs
between the entry points.
"""

import json
import logging as std_logging
import math
import os
import time
from typing import Any, Callable, Protocol

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from model import ModelConfig, Transformer
from train import checkpoint as checkpoint_lib
from train import metrics as metrics_lib
from train import optimizer as optimizer_lib
from train import preemption
from train import sharding as sharding_lib
from train import state as state_lib
from train import step as step_lib
from train import validate


class DataSource(Protocol):
  vocab_size: int

  def train_iterator(self, shard_index: int, shard_count: int, batch_size: int):
    """Endless iterator of numpy batches with get_state() -> bytes and set_state(bytes)."""

  def eval_batches(self, shard_index: int, shard_count: int, batch_size: int,
                   max_batches: int) -> list[dict[str, np.ndarray]]:
    """This host's held-out batches (possibly none)."""


class Run:
  """Everything derived from the config that both training and tooling need."""

  def __init__(self, config: Any, tokenizer_vocab: int | None = None):
    self.config = config
    self.model_config = ModelConfig.from_dict(config.model)
    validate.check(config, self.model_config, jax.device_count(), tokenizer_vocab)
    self.mesh = sharding_lib.make_mesh(config.mesh)
    self.model = Transformer(self.model_config)
    self.tx, self.schedule = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
    self.state_shardings = state_lib.state_shardings(self.model, self.tx, self.mesh)
    self.batch_sharding = sharding_lib.batch_sharding(self.mesh)

  def abstract_state(self):
    return state_lib.abstract_state(self.model, self.tx, self.mesh)

  def train_step(self):
    step = step_lib.make_train_step(self.model, self.tx, self.schedule,
                                    grad_accum_steps=self.config.train.grad_accum_steps,
                                    z_loss=self.config.train.z_loss)
    return step_lib.jit_train_step(step, self.state_shardings, self.mesh)

  def eval_step(self):
    return step_lib.jit_eval_step(step_lib.make_eval_step(self.model), self.state_shardings.params,
                                  self.mesh)

  def global_batch(self, local_batch):
    return sharding_lib.global_batch_from_local(local_batch, self.batch_sharding,
                                                self.config.train.batch_size)


def evaluate(run: Run, eval_step, params, batches) -> dict[str, float]:
  """Loss and perplexity over the held-out batches of every host."""
  totals = None
  for batch in batches:
    sums = eval_step(params, run.global_batch(batch))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  totals = jax.device_get(totals)
  loss = float(totals['ce'] / max(totals['weight'], 1.0))
  return {'eval_loss': loss, 'eval_perplexity': math.exp(min(loss, 50.0)),
          'eval_tokens': float(totals['weight'])}


def _equalize_eval_batches(batches, batch_size):
  """Every host must run the same number of eval steps: pad the shorter hosts with empty batches."""
  count = len(batches)
  if jax.process_count() > 1:
    count = int(np.max(multihost_utils.process_allgather(np.array(count))))
  if len(batches) < count:
    if not batches:
      raise ValueError('This host has no eval data while others do; give every host some eval data')
    empty = {k: np.zeros_like(v) for k, v in batches[0].items()}
    batches = batches + [empty] * (count - len(batches))
  return batches


_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _LibraryInfoFilter(std_logging.Filter):
  """Keeps libraries' warnings and errors but only our own INFO lines (orbax alone logs a dozen per
  checkpoint), so that the training log stays readable."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or (
        record.pathname.startswith(_PROJECT_ROOT) and 'site-packages' not in record.pathname)


def quiet_library_logs():
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
    handler.addFilter(_LibraryInfoFilter())


def _format_line(step: int, total: int, m: dict[str, float]) -> str:
  parts = [f'step {step}/{total}', f"loss {m['loss']:.4f}", f"lr {m['learning_rate']:.2e}",
           f"grad_norm {m['grad_norm']:.3f}"]
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


class TrainingDiverged(RuntimeError):
  pass


class Trainer:
  """One training run: state, input iterators, checkpointer and metric writer, built in that order
  from the config, then `fit()` to step until `config.train.steps` or a stop signal."""

  def __init__(self, config: Any, workdir: str, data: DataSource,
               init_params: Callable[[Run], Any] | None = None):
    quiet_library_logs()
    sharding_lib.maybe_initialize_distributed(**config.distributed)
    self.config, self.workdir, self.data = config, workdir, data
    self.run = run = Run(config, tokenizer_vocab=data.vocab_size)
    self.primary = jax.process_index() == 0
    self.ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), config.checkpoint.keep,
                                            config.checkpoint.async_save, run.model_config)
    self.resumed_from = self.ckpt.latest_step()
    validate.check_workdir(config, workdir, self.resumed_from is not None)
    if self.primary:
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      _write_text(os.path.join(workdir, 'config.json'), config.to_json_best_effort(indent=2))
    self.writer = metrics_lib.MetricWriter(
        workdir, enabled=self.primary, wandb_project=config.logging.wandb_project,
        wandb_entity=config.logging.wandb_entity, run_config=json.loads(config.to_json_best_effort()))

    tcfg = config.train
    shard_index, shard_count, local_batch = sharding_lib.data_shard(run.batch_sharding, tcfg.batch_size)
    self.train_iter = data.train_iterator(shard_index, shard_count, local_batch)
    self.eval_batches = _equalize_eval_batches(
        data.eval_batches(shard_index, shard_count, local_batch, tcfg.eval_max_batches), local_batch)

    if self.resumed_from is not None:
      self.state, data_state = self.ckpt.restore(self.resumed_from, run.abstract_state())
      if data_state is None:
        logging.warning('Checkpoint %d has no input-pipeline position; data restarts from the '
                        'beginning', self.resumed_from)
      else:
        self.train_iter.set_state(data_state)
      logging.info('Resumed from %s at step %d', self.ckpt.directory, self.resumed_from)
    # Read the first batch before initialising or compiling anything: bad input fails fast.
    self.first_batch = next(self.train_iter)
    if self.resumed_from is None:
      params = init_params(run) if init_params else None
      self.state = state_lib.init_state(run.model, run.tx, run.mesh, tcfg.seed, params)
    n_params = sum(x.size for x in jax.tree.leaves(self.state.params))
    logging.info('Model: %s parameters; mesh %s; %d process(es), %d device(s); local batch %d x %d',
                 f'{n_params:,}', dict(run.mesh.shape), jax.process_count(), jax.device_count(),
                 local_batch, tcfg.seq_len)

    self.train_step, self.eval_step = run.train_step(), run.eval_step()
    self.flops_per_step = metrics_lib.train_flops_per_token(run.model_config, tcfg.seq_len) * (
        tcfg.batch_size * tcfg.seq_len)
    self.peak = metrics_lib.peak_tflops()
    self.last: dict[str, float] = {}
    self.eval_history: list[dict] = []

  # -- pieces of a step ---------------------------------------------------------------------------

  def evaluate(self, step: int):
    if not self.eval_batches:
      return
    result = evaluate(self.run, self.eval_step, self.state.params, self.eval_batches)
    self.writer.write(step, result)
    self.last.update(result)
    self.eval_history.append({'step': step, **result})
    if self.primary:
      _write_json(os.path.join(self.workdir, 'eval_results.json'), self.eval_history,
                  append_to_existing=True)
      logging.info('eval at step %d: loss %.4f | perplexity %.2f | %d tokens', step,
                   result['eval_loss'], result['eval_perplexity'], result['eval_tokens'])

  def log(self, step: int, fetched: list[dict], seconds_per_step: float | None):
    tcfg = self.config.train
    m = {k: float(np.mean([f[k] for f in fetched])) for k in fetched[0]}
    for k in ('tokens', 'skipped'):
      if k in m:
        m[k] = float(np.sum([f[k] for f in fetched]))
    if seconds_per_step:
      m['step_time_ms'] = 1000 * seconds_per_step
      m['tokens_per_sec'] = tcfg.batch_size * tcfg.seq_len / seconds_per_step
      m['tflops_per_device'] = self.flops_per_step / seconds_per_step / jax.device_count() / 1e12
      if self.peak:
        m['mfu'] = m['tflops_per_device'] / self.peak
    stats = getattr(self.data, 'stats', None)
    if stats:
      m.update({f'data/{k}': float(v) for k, v in stats().items()})
    self.writer.write(step, m)
    self.last.update(m)
    if self.primary:
      logging.info(_format_line(step, tcfg.steps, m))

  def save(self, step: int):
    self.ckpt.save(step, self.state, self.train_iter.get_state())

  # -- the loop -----------------------------------------------------------------------------------

  def fit(self) -> dict[str, float]:
    """Trains to `config.train.steps`, or to the step at which a stop signal was agreed."""
    tcfg = self.config.train
    step = int(jax.device_get(self.state.step))
    if step == 0 and tcfg.eval_at_start:
      self.evaluate(0)
    # Timing windows start after the first step, whose time is mostly compilation.
    pending, window_start, window_steps = [], None, 0
    consecutive_skips, last_saved = 0, self.resumed_from
    stopped_by = None
    with preemption.StopRequest() as stop:
      while step < tcfg.steps:
        local_batch, self.first_batch = self.first_batch or next(self.train_iter), None
        batch = self.run.global_batch(local_batch)
        self.state, step_metrics = self.train_step(self.state, batch)
        step += 1
        pending.append(step_metrics)
        if window_start is None:
          jax.block_until_ready(step_metrics)
          logging.info('First step (with compilation) done')
          window_start = time.perf_counter()
        else:
          window_steps += 1

        if 'skipped' in step_metrics:
          if int(jax.device_get(step_metrics['skipped'])):
            consecutive_skips += 1
            logging.warning('step %d: non-finite loss or gradient (loss %s); update skipped (%d in '
                            'a row)', step, float(jax.device_get(step_metrics['loss'])), consecutive_skips)
            if consecutive_skips > tcfg.max_consecutive_skips:
              self.ckpt.wait()
              raise TrainingDiverged(
                  f'{consecutive_skips} consecutive steps (up to step {step}) had a non-finite loss or '
                  f'gradient (train.max_consecutive_skips = {tcfg.max_consecutive_skips}). The last '
                  f'checkpoint, step {last_saved}, is intact. Lower optimizer.lr, raise warmup, or '
                  'check the data around these steps before resuming.')
          else:
            consecutive_skips = 0

        if step % tcfg.log_every == 0 or step == tcfg.steps:
          fetched = jax.device_get(pending)
          self.log(step, fetched,
                   (time.perf_counter() - window_start) / window_steps if window_steps else None)
          pending, window_start, window_steps = [], time.perf_counter(), 0
        if tcfg.eval_every and step % tcfg.eval_every == 0 and step != tcfg.steps:
          self.evaluate(step)
        stopping = stop.should_stop()
        if step % self.config.checkpoint.every_steps == 0 or step == tcfg.steps or stopping:
          self.save(step)
          last_saved = step
        if stopping:
          stopped_by = stop.signal_name or 'a signal on another host'
          break

    if stopped_by is None and (self.resumed_from is None or self.resumed_from < tcfg.steps):
      self.evaluate(step)
    self.ckpt.wait()
    self.ckpt.close()
    self.writer.close()
    if stopped_by:
      logging.warning('Stopped at step %d (%s); checkpoint saved in %s. Run the same command to '
                      'resume.', step, stopped_by, self.ckpt.directory)
      self.last['stopped_at'] = step
    if self.primary:
      _write_json(os.path.join(self.workdir, 'final_metrics.json'), {'step': step, **self.last})
    return self.last


def define_flags():
  """--config (a config file, with --config.a.b=value overrides) and --workdir: the flags of both
  entry points, defined only when one runs as a program (importing both, as tests do, must not define
  a flag twice)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel  (not on GPU images)
  config_flags.DEFINE_config_file('config', None, 'Path to a config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Checkpoints, logs and metrics go here; a run resumes '
                      'from the latest checkpoint in it.')
  flags.mark_flags_as_required(['config', 'workdir'])


def train(config: Any, workdir: str, data: DataSource,
          init_params: Callable[[Run], Any] | None = None) -> dict[str, float]:
  """Trains to `config.train.steps`, resuming from `workdir` if it holds checkpoints.

  `init_params(run)` supplies starting parameters for a fresh run (fine-tuning); a fresh optimizer
  state is built around them. Returns the last logged metrics.
  """
  return Trainer(config, workdir, data, init_params).fit()


def _write_json(path: str, value, append_to_existing: bool = False):
  """With `append_to_existing`, `value` (a list) extends what a previous run of the same workdir
  wrote, minus entries for steps this run has redone."""
  if append_to_existing and epath.Path(path).exists():
    earlier = json.loads(epath.Path(path).read_text())
    first_step = value[0]['step']
    value = [e for e in earlier if e['step'] < first_step] + value
  _write_text(path, json.dumps(value, indent=2))


def _write_text(path: str, text: str):
  """Local files are replaced atomically; on object stores (gs://) a single write is atomic already."""
  if metrics_lib.is_remote(path):
    epath.Path(path).write_text(text)
    return
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(path + '.tmp', path)

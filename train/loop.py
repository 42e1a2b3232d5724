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
from jax.experimental import multihost_utils

from model import ModelConfig, Transformer
from train import checkpoint as checkpoint_lib
from train import metrics as metrics_lib
from train import optimizer as optimizer_lib
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
  return ' | '.join(parts)


def train(config: Any, workdir: str, data: DataSource,
          init_params: Callable[[Run], Any] | None = None) -> dict[str, float]:
  """Trains to `config.train.steps`, resuming from `workdir` if it holds checkpoints.

  `init_params(run)` supplies starting parameters for a fresh run (fine-tuning); a fresh optimizer
  state is built around them. Returns the last logged metrics.
  """
  quiet_library_logs()
  sharding_lib.maybe_initialize_distributed(**config.distributed)
  run = Run(config, tokenizer_vocab=data.vocab_size)
  tcfg = config.train
  primary = jax.process_index() == 0
  if primary:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=2))
  writer = metrics_lib.MetricWriter(workdir, enabled=primary)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), config.checkpoint.keep,
                                     config.checkpoint.async_save, run.model_config)

  shard_index, shard_count, local_batch = sharding_lib.data_shard(run.batch_sharding, tcfg.batch_size)
  train_iter = data.train_iterator(shard_index, shard_count, local_batch)
  eval_batches = _equalize_eval_batches(
      data.eval_batches(shard_index, shard_count, local_batch, tcfg.eval_max_batches), local_batch)

  latest = ckpt.latest_step()
  if latest is not None:
    state, data_state = ckpt.restore(latest, run.abstract_state())
    if data_state is None:
      logging.warning('Checkpoint %d has no input-pipeline position; data restarts from the beginning',
                      latest)
    else:
      train_iter.set_state(data_state)
    logging.info('Resumed from %s at step %d', ckpt.directory, latest)
  else:
    params = init_params(run) if init_params else None
    state = state_lib.init_state(run.model, run.tx, run.mesh, tcfg.seed, params)

  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info('Model: %s parameters; mesh %s; %d process(es), %d device(s); local batch %d x %d',
               f'{n_params:,}', dict(run.mesh.shape), jax.process_count(), jax.device_count(),
               local_batch, tcfg.seq_len)

  train_step, eval_step = run.train_step(), run.eval_step()
  flops_per_step = metrics_lib.train_flops_per_token(run.model_config, tcfg.seq_len) * (
      tcfg.batch_size * tcfg.seq_len)
  peak = metrics_lib.peak_tflops()
  step = int(jax.device_get(state.step))
  last: dict[str, float] = {}

  eval_history = []

  def run_eval(at_step):
    if not eval_batches:
      return
    result = evaluate(run, eval_step, state.params, eval_batches)
    writer.write(at_step, result)
    last.update(result)
    eval_history.append({'step': at_step, **result})
    if primary:
      _write_json(os.path.join(workdir, 'eval_results.json'), eval_history, append_to_existing=True)
      logging.info('eval at step %d: loss %.4f | perplexity %.2f | %d tokens', at_step,
                   result['eval_loss'], result['eval_perplexity'], result['eval_tokens'])

  if step == 0 and tcfg.eval_at_start:
    run_eval(0)

  # Timing windows start after the first step, whose time is mostly compilation.
  pending, window_start, window_steps = [], None, 0
  while step < tcfg.steps:
    batch = run.global_batch(next(train_iter))
    state, step_metrics = train_step(state, batch)
    step += 1
    pending.append(step_metrics)
    if window_start is None:
      jax.block_until_ready(step_metrics)
      logging.info('First step (with compilation) done')
      window_start = time.perf_counter()
    else:
      window_steps += 1

    if step % tcfg.log_every == 0 or step == tcfg.steps:
      fetched = jax.device_get(pending)
      m = {k: float(np.mean([f[k] for f in fetched])) for k in fetched[0]}
      m['tokens'] = float(np.sum([f['tokens'] for f in fetched]))
      if window_steps:
        step_time = (time.perf_counter() - window_start) / window_steps
        m['step_time_ms'] = 1000 * step_time
        m['tokens_per_sec'] = tcfg.batch_size * tcfg.seq_len / step_time
        m['tflops_per_device'] = flops_per_step / step_time / jax.device_count() / 1e12
        if peak:
          m['mfu'] = m['tflops_per_device'] / peak
      writer.write(step, m)
      last.update(m)
      if primary:
        logging.info(_format_line(step, tcfg.steps, m))
      pending, window_start, window_steps = [], time.perf_counter(), 0

    if tcfg.eval_every and step % tcfg.eval_every == 0 and step != tcfg.steps:
      run_eval(step)
    if step % config.checkpoint.every_steps == 0 or step == tcfg.steps:
      ckpt.save(step, state, train_iter.get_state())

  if latest is None or latest < tcfg.steps:
    run_eval(step)
  ckpt.wait()
  ckpt.close()
  writer.close()
  if primary:
    _write_json(os.path.join(workdir, 'final_metrics.json'), {'step': step, **last})
  return last


def _write_json(path: str, value, append_to_existing: bool = False):
  """Writes atomically. With `append_to_existing`, `value` (a list) extends what a previous run of
  the same workdir wrote, minus entries for steps this run has redone."""
  if append_to_existing and os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      earlier = json.load(f)
    first_step = value[0]['step']
    value = [e for e in earlier if e['step'] < first_step] + value
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(value, f, indent=2)
  os.replace(path + '.tmp', path)

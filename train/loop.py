"""The training loop shared by `train.pretrain`, `train.sft` and `train.dpo`, and where a run is assembled.

`train()` builds every run in this order, each piece once:
  1. the workdir lock (workdir.RunLock); a finished run is left as it is; the workdir's config checked
  2. the data (the entry point's DataSource: the only thing that differs between them)
  3. the Run (train/run.py): model, mesh, objective, optimizer, shardings
  4. the Start (train/start.py `resolve`): the workdir's newest intact step, with its data position
     and the frozen models its checkpoint points to; or config.init_from's parameters; or a random
     init. The only place a run reads checkpoints.
  5. preference tuning with a precomputed reference: the reference pass (train/reference_pass.py),
     on the starting model, or its table read back from the workdir
  6. the Trainer: input iterators at the Start's data position (the reference table joined to the
     batches), the first batch read, then the checkpointer and metric writers, the jitted steps
  7. `Trainer.fit()`: the jitted step over the host's batches, periodic eval, logs and checkpoints.
Everything that can fail on bad input (config, data, tokenizer, checkpoint, init_from, the first batch)
is tried before this run's files are written to the workdir (the reference table of step 5 excepted:
it is a result, reused by the next run). Process setup (logs, jax.distributed, host memory) and ending
(runtime/__init__.py) are the entry point's.

After each step the hooks (train/hooks.py) run, each owning its cadence: the non-finite guard, logging
and throughput, evaluation with early stopping, preemption, checkpoints; `Trainer.add_hook` adds one,
and an entry point whose batches are not the data source's (train.grpo: rollouts of the current
parameters) passes its own Trainer class, which overrides `Trainer.next_batch`.
"""

import contextlib
import json
import os
from typing import Any, Callable, Protocol

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from data.batch import empty_like
from data.records import BadRecord
from model.weights import params as params_lib
import runtime
from train import batches as batches_lib
from train import checkpoint as checkpoint_lib
from train import evaluation as evaluation_lib
from train import hooks as hooks_lib
from train import metrics as metrics_lib
from train import reference_pass
from train import start as start_lib
from train import workdir as workdir_lib
from train.chips import peak_tflops
from train.run import Run
from train.spec import Spec


class DataSource(Protocol):
  vocab_size: int

  def train_iterator(self, shard_index: int, shard_count: int, batch_size: int):
    """Endless iterator of numpy batches with get_state() -> bytes and set_state(bytes)."""

  def eval_batches(self, shard_index: int, shard_count: int, batch_size: int,
                   max_batches: int) -> list[dict[str, np.ndarray]]:
    """This host's held-out batches (possibly none)."""


def evaluate(run: Run, eval_step, state, batches) -> dict[str, float]:
  """The objective's held-out results (loss and perplexity; for preference tuning, loss and
  preference accuracy) over the held-out batches of every host."""
  totals = None
  for batch in batches:
    sums = eval_step(state, run.global_batch(batch))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  return run.objective.eval_results(jax.device_get(totals))


def _equalize_eval_batches(batches):
  """Every host must run the same number of eval steps: pad the shorter hosts with empty batches."""
  count = len(batches)
  if jax.process_count() > 1:
    count = int(np.max(multihost_utils.process_allgather(np.array(count))))
  if len(batches) < count:
    if not batches:
      raise ValueError('This host has no eval data while others do; give every host some eval data')
    batches = batches + [empty_like(batches[0])] * (count - len(batches))
  return batches


TrainingDiverged = hooks_lib.TrainingDiverged  # raised by the non-finite guard; callers catch it here


class Trainer:
  """One training run, from its Run and Start (see the module docstring): input iterators at the
  Start's data position, the first batch, checkpointer and metric writer, in that order, so that bad
  input fails before the workdir is written to; then `fit()` steps until `config.train.steps` or a
  stop signal. `reference_logps`: preference tuning's precomputed reference table, joined to the
  batches by pair (train/reference_pass.py)."""

  def __init__(self, config: Any, workdir: str, run: Run, data: DataSource, start: start_lib.Start,
               reference_logps: np.ndarray | None = None):
    self.config, self.workdir, self.data, self.run = config, workdir, data, run
    self.primary = jax.process_index() == 0
    self.state = start.state
    self.resumed_from = start.step if start.kind == start_lib.RESUME else None

    tcfg = config.train
    shard_index, shard_count, local_batch = batches_lib.data_shard(run.batch_sharding, tcfg.batch_size)
    self.train_iter = data.train_iterator(shard_index, shard_count, local_batch)
    eval_batches = data.eval_batches(shard_index, shard_count, local_batch, tcfg.eval_max_batches)
    if run.preference:  # the pairs' index out, their reference log-probabilities (if any) in
      self.train_iter = reference_pass.Joined(self.train_iter, reference_logps)
      eval_batches = [reference_pass.join(b, reference_logps) for b in eval_batches]
    self.eval_batches = _equalize_eval_batches(eval_batches)
    # Task metrics of generated answers, and early stopping on any evaluated value (train/evaluation.py).
    self.generation = (evaluation_lib.GenerationEval(config, run, data, workdir, self.primary)
                       if evaluation_lib.generation_metrics(config) else None)
    evaluated = (['eval_loss', 'eval_perplexity'] if self.eval_batches else []) + (
        [f'eval_{m}' for m in self.generation.metrics] if self.generation else [])
    self.early_stopping = evaluation_lib.EarlyStopping(config, evaluated)
    if start.data_state is not None:
      self.train_iter.set_state(start.data_state)
    elif self.resumed_from is not None:
      logging.warning('Checkpoint %d has no input-pipeline position; data restarts from the '
                      'beginning', self.resumed_from)
    # Read the first batch before anything is written: bad input fails fast.
    self.first_batch = self._next_batch()

    # Only now, with the config, data, tokenizer and starting point known to be good, the workdir
    # gets this run's files.
    self.ckpt = checkpoint_lib.Checkpointer(checkpoint_lib.folder(workdir), config.checkpoint.keep,
                                            config.checkpoint.async_save, run.model_config)
    self.ckpt.base, self.ckpt.reference = start.base, start.reference  # saved with every step
    if self.resumed_from is not None:
      self.early_stopping.replay(workdir, self.resumed_from, self.ckpt.directory)
      if self.early_stopping.best_step is not None:
        self.ckpt.pin(self.early_stopping.best_step)
    if self.primary:
      workdir_lib.write_config(workdir, config)
    self.writer = metrics_lib.MetricWriter(
        workdir, enabled=self.primary, wandb_project=config.logging.wandb_project,
        wandb_entity=config.logging.wandb_entity, run_config=json.loads(config.to_json_best_effort()))
    n_params = sum(x.size for x in jax.tree.leaves(self.state.params))
    frozen = (f' trainable (LoRA rank {run.lora.rank} on {run.lora.targets}) over a frozen base of '
              f'{sum(x.size for x in jax.tree.leaves(self.state.frozen)):,} values'
              if run.lora.enabled else '')
    logging.info('Model: %s parameters%s; mesh %s; %d process(es), %d device(s); local batch %d x %d',
                 f'{n_params:,}', frozen, dict(run.mesh.shape), jax.process_count(),
                 jax.device_count(), local_batch, tcfg.seq_len)

    self.train_step, self.eval_step = run.train_step(), run.eval_step()
    self.flops_per_step = metrics_lib.train_flops_per_token(run.model_config, tcfg.seq_len) * (
        tcfg.batch_size * tcfg.seq_len)
    self.peak = peak_tflops()
    self.last: dict[str, float] = {}
    self.hooks = self._default_hooks()

  def _next_batch(self):
    try:
      return next(self.train_iter)
    except BadRecord as e:
      if 'skip_bad_records' in str(e):
        raise
      raise BadRecord(f'{e}. Fix or remove that record, or skip (and count) bad records with '
                      '--config.data.skip_bad_records=True') from None

  # -- the hooks ----------------------------------------------------------------------------------

  def _default_hooks(self) -> list[hooks_lib.Hook]:
    """The hooks every run has, in the order they run after a step (train/hooks.py says why)."""
    config, tcfg, ckpt, stopping = self.config, self.config.train, self.ckpt, self.early_stopping
    self.stop = hooks_lib.Stop()
    held_out = ((lambda state: evaluate(self.run, self.eval_step, state, self.eval_batches))
                if self.eval_batches else None)
    self.evaluation = hooks_lib.Evaluation(
        tcfg.steps, tcfg.eval_every, held_out, self.generation, stopping, self.stop, ckpt.pin,
        self.record, self.workdir, self.primary)
    self.preemption = hooks_lib.Preemption(self.stop)
    self.checkpoints = hooks_lib.Checkpoints(
        ckpt, config.checkpoint.every_steps, tcfg.steps, stopping, self.stop,
        self.train_iter.get_state, self.workdir, self.primary, last_saved=self.resumed_from)
    return [
        hooks_lib.NonFiniteGuard(tcfg.max_consecutive_skips, self.checkpoints.settle),
        hooks_lib.Logging(tcfg.steps, tcfg.log_every, tcfg.batch_size * tcfg.seq_len,
                          self.flops_per_step, self.peak, self.record,
                          getattr(self.data, 'stats', None), self.primary),
        self.evaluation,
        self.preemption,
        self.checkpoints,
    ]

  def add_hook(self, hook: hooks_lib.Hook):
    """Runs `hook` after every step it is due at: after the step's log and evaluation, before the
    stop signal is read and the checkpoint saved (so a stop it asks for is saved at that step)."""
    self.hooks.insert(self.hooks.index(self.preemption), hook)

  def record(self, step: int, scalars: dict[str, float]):
    """Writes `scalars` of `step` (metrics.jsonl, TensorBoard, W&B); the final metrics keep the last
    value of each."""
    self.writer.write(step, scalars)
    self.last.update(scalars)

  def next_batch(self, step: int):
    """The global batch of the step after `step` (the steps done): this host's next rows of the data
    source, assembled. An entry point whose batches come from elsewhere (rollouts of the current
    state) overrides it, in a subclass or by assigning `trainer.next_batch`."""
    local_batch, self.first_batch = self.first_batch or self._next_batch(), None
    return self.run.global_batch(local_batch)

  # -- the loop -----------------------------------------------------------------------------------

  def fit(self) -> dict[str, float]:
    """Trains to `config.train.steps`, or to the step at which a stop signal was agreed or early
    stopping stopped (a rerun of an early-stopped run trains no further)."""
    tcfg, stopping_early = self.config.train, self.early_stopping
    step = int(jax.device_get(self.state.step))
    if step == 0 and tcfg.eval_at_start:
      self.evaluation.evaluate(0, self.state)
    try:
      step = self._loop(step)
      stopped_by = self.preemption.stopped_by
      if stopped_by is None and stopping_early.stopped_at is None and (
          self.resumed_from is None or self.resumed_from < tcfg.steps):
        self.evaluation.evaluate(step, self.state, final=True)  # while the last checkpoint is written
    except BaseException as e:
      self._after_failure(e)
      raise
    self.ckpt.wait()
    if self.primary:
      stopping_early.publish(self.workdir, self.ckpt.directory)
    self.ckpt.close()
    self.writer.close()
    if stopped_by:
      logging.warning('Stopped at step %d (%s); checkpoint saved in %s. Run the same command to '
                      'resume.', step, stopped_by, self.ckpt.directory)
      self.last['stopped_at'] = step
    if stopping_early.stopped_at is not None:
      logging.info('Early stopping at step %d: %s has not improved on step %d by more than %g in %d '
                   'evaluations', stopping_early.stopped_at, stopping_early.metric,
                   stopping_early.best_step, stopping_early.min_delta, stopping_early.waiting)
    best = stopping_early.summary(self.ckpt.directory)
    if best:
      logging.info('Best checkpoint: step %d (%s %.4f), %s; select it with --ckpt %s%s',
                   stopping_early.best_step, stopping_early.metric, stopping_early.best_value,
                   best['best_checkpoint'], self.workdir, params_lib.BEST)
    if self.primary:
      workdir_lib.write_json(os.path.join(self.workdir, workdir_lib.FINAL_METRICS),
                             {'step': step, **self.last, **best})
    return self.last

  def _after_failure(self, error: BaseException):
    """Keeps what the run has done: the checkpoint in flight finishes (unless the user interrupted, or
    it is what failed), and the metrics are flushed. The input pipeline is left running: destroying
    a tf.data iterator with work in flight can deadlock (runtime/__init__.py ends the process)."""
    lost = None
    if not isinstance(error, (KeyboardInterrupt, checkpoint_lib.CheckpointNotWritten)):
      try:
        self.ckpt.wait()
      except checkpoint_lib.CheckpointNotWritten as e:
        lost = e
      except Exception as e:  # pylint: disable=broad-exception-caught
        logging.error('The checkpoint in flight failed too: %s', e)
    self.writer.close()
    if lost is not None:
      # Often the same cause (a full disk fails the save in flight and then the next metrics write):
      # which checkpoint is lost and which is intact is what the user needs to read first.
      logging.error('%s', runtime.describe(error))
      raise lost from error

  def _loop(self, step: int) -> int:
    """Steps to `train.steps`, or until a hook asks to stop; returns the step reached. After each
    step, the hooks due at it run, in order."""
    with contextlib.ExitStack() as running:
      for hook in self.hooks:
        running.enter_context(hook)
      while step < self.config.train.steps and not self.stop:
        self.state, metrics = self.train_step(self.state, self.next_batch(step))
        step += 1
        info = hooks_lib.StepInfo(step, self.state, metrics)
        for hook in self.hooks:
          if hook.due(step):
            hook(info)
    return step


def train(config: Any, workdir: str, data: DataSource | Callable[[], DataSource],
          trainer: type | None = None) -> dict[str, float]:
  """Trains to `config.train.steps`, resuming from `workdir` if it holds checkpoints, else starting
  from config.init_from if set (fine-tuning: a fresh optimizer around its parameters); one run per
  workdir (workdir.RunLock); a run that has finished already is left as it is. Assembles the run in the
  order of the module docstring.

  `data`: a DataSource, or a function that builds one (called once the workdir is locked). `trainer`:
  the Trainer class (default: Trainer; train.grpo's samples its batches). Returns the last logged
  metrics (a finished run's final metrics).
  """
  config = Spec.of(config)  # the frozen, checked sections every component reads from here on
  with workdir_lib.RunLock(workdir, take_over=config.train.take_over_lock):
    final = workdir_lib.finished_run(workdir, config.train.steps)
    if final is not None:
      workdir_lib.check_config(config, workdir, has_checkpoint=True)
      logging.warning('%s finished at step %d already (train.steps = %d): nothing to do, its results '
                      'are kept. Raise --config.train.steps to train on, or use a new --workdir.',
                      workdir, final['step'], config.train.steps)
      return final
    workdir_lib.check_config(config, workdir, start_lib.latest_step(workdir) is not None)
    data = data() if callable(data) else data
    run = Run(config, tokenizer_vocab=data.vocab_size)
    start = start_lib.resolve(run, config, workdir)
    reference_logps = (reference_pass.table(run, config, workdir, start, data)
                       if run.precomputed_reference else None)
    return (trainer or Trainer)(config, workdir, run, data, start, reference_logps).fit()

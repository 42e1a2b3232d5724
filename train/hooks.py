"""The parts of the training loop that run after a step, each deciding its own cadence.

After every step the loop (`Trainer._loop`, train/loop.py) hands a `StepInfo` to each hook whose
`due(step)` is true, in the order of `Trainer.hooks`; a hook that asks the run's `Stop` to stop ends
the loop once that step's hooks have run. A hook is also entered (`with`) around the whole loop, for
what it holds only while steps run (the signal handlers of `Preemption`).

The default hooks, in their order, and why that order:

  NonFiniteGuard  every step: counts the steps in a row whose update was skipped for a non-finite loss
                  or gradient, and raises TrainingDiverged past train.max_consecutive_skips. First, so
                  that the step that diverges is neither logged nor saved.
  Logging         keeps every step's metrics and the timing window; writes the log line and metrics
                  every train.log_every steps and at the last step. Before Evaluation: a step's log
                  line comes before its evaluation, whose time falls in the next window.
  Evaluation      held-out loss every train.eval_every steps, task metrics at eval.generation's
                  cadence, both written as one evaluation; early stopping takes it, pins a new best
                  and asks to stop. Before Checkpoints, so that the best step is saved in that step.
  (hooks added with Trainer.add_hook, in the order added)
  Preemption      every step: a SIGTERM or SIGINT, agreed on by every host, asks to stop. After the
                  evaluation, so that a signal that arrives while it runs stops this step, not the next.
  Checkpoints     every checkpoint.every_steps steps, at the last step, at the best evaluation, and at
                  a step after which the loop stops (preemption, early stopping, or any hook's request).

A custom hook subclasses `Hook`: it sets `every` (or overrides `due`) and implements `__call__`;
`Trainer.record(step, scalars)` writes its values beside the others.
"""

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging

from train import metrics as metrics_lib
from train import preemption
from train import workdir as workdir_lib


class TrainingDiverged(RuntimeError):
  pass


@dataclasses.dataclass
class StepInfo:
  """What every due hook is handed after a step."""
  step: int  # the steps done: the state's step count after this step
  state: Any  # the train state after this step
  metrics: dict[str, Any]  # the step's metrics, on device: reading one waits for the step


class Stop:
  """Whether the loop ends after the current step's hooks; any hook may ask, saying why."""

  def __init__(self):
    self.reasons: list[str] = []

  def request(self, reason: str):
    self.reasons.append(reason)

  def __bool__(self) -> bool:
    return bool(self.reasons)


class Hook:
  """A part of the loop that runs after the steps it is due at: every `every` steps, unless it
  overrides `due`. Entered around the loop (nothing to do by default)."""
  every = 1

  def due(self, step: int) -> bool:
    return step % self.every == 0

  def __call__(self, info: StepInfo) -> None:
    raise NotImplementedError

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    return None


class NonFiniteGuard(Hook):
  """Counts the steps in a row that skipped their update (the step's `skipped` metric: a non-finite
  loss or gradient); more than `max_skips` raise TrainingDiverged, naming the last checkpoint once
  `settle()` (which waits for a save in flight and returns its step) has made sure it is intact."""

  def __init__(self, max_skips: int, settle: Callable[[], int | None]):
    self.max_skips, self.settle = max_skips, settle
    self.consecutive = 0

  def __call__(self, info: StepInfo):
    if 'skipped' not in info.metrics:
      return
    if not int(jax.device_get(info.metrics['skipped'])):
      self.consecutive = 0
      return
    self.consecutive += 1
    logging.warning('step %d: non-finite loss or gradient (loss %s); update skipped (%d in a row)',
                    info.step, float(jax.device_get(info.metrics['loss'])), self.consecutive)
    if self.consecutive > self.max_skips:
      last_saved = self.settle()
      raise TrainingDiverged(
          f'{self.consecutive} consecutive steps (up to step {info.step}) had a non-finite loss or '
          f'gradient (train.max_consecutive_skips = {self.max_skips}). The last checkpoint, step '
          f'{last_saved}, is intact. Lower optimizer.lr, raise warmup, or check the data around these '
          'steps before resuming.')


class Logging(Hook):
  """The training log line and metrics. Each logged value is the mean over the steps since the last
  log (tokens and skips: their sum), with throughput and MFU measured over the same steps; the first
  step, mostly compilation, is in no timing window. Due at every step, to keep the step's metrics
  (a reference: nothing waits for the device); `writes(step)` says when it writes."""

  def __init__(self, steps: int, log_every: int, tokens_per_step: int, flops_per_step: float,
               peak_tflops: float | None, record: Callable[[int, dict], None],
               data_stats: Callable[[], dict] | None = None, primary: bool = True):
    self.steps, self.log_every = steps, log_every
    self.tokens_per_step, self.flops_per_step, self.peak = tokens_per_step, flops_per_step, peak_tflops
    self.record, self.data_stats, self.primary = record, data_stats, primary
    self.pending: list[dict] = []  # the metrics of the steps since the last log, on device
    self.window_start: float | None = None  # None until the first step is done
    self.window_steps = 0

  def due(self, step: int) -> bool:
    return True

  def writes(self, step: int) -> bool:
    return step % self.log_every == 0 or step == self.steps

  def __call__(self, info: StepInfo):
    self.pending.append(info.metrics)
    if self.window_start is None:
      jax.block_until_ready(info.metrics)
      logging.info('First step (with compilation) done')
      self.window_start = time.perf_counter()
    else:
      self.window_steps += 1
    if self.writes(info.step):
      fetched = jax.device_get(self.pending)
      self.write(info.step, fetched, (time.perf_counter() - self.window_start) / self.window_steps
                 if self.window_steps else None)
      self.pending, self.window_start, self.window_steps = [], time.perf_counter(), 0

  def write(self, step: int, fetched: list[dict], seconds_per_step: float | None):
    m = {k: float(np.mean([f[k] for f in fetched])) for k in fetched[0]}
    for k in ('tokens', 'skipped'):
      if k in m:
        m[k] = float(np.sum([f[k] for f in fetched]))
    if seconds_per_step:
      m['step_time_ms'] = 1000 * seconds_per_step
      m['tokens_per_sec'] = self.tokens_per_step / seconds_per_step
      m['tflops_per_device'] = self.flops_per_step / seconds_per_step / jax.device_count() / 1e12
      if self.peak:
        m['mfu'] = m['tflops_per_device'] / self.peak
    if self.data_stats:
      m.update({f'data/{k}': float(v) for k, v in self.data_stats().items()})
    self.record(step, m)
    if self.primary:
      logging.info(metrics_lib.format_line(step, self.steps, m))


class Evaluation(Hook):
  """The held-out results (`held_out(state)`: loss and perplexity, or the objective's) every
  `every` steps, and the task metrics of generated answers (`generation`, train/evaluation.py) at
  its own cadence; at step 0 and in the final evaluation, all of them. The results of a step are one
  evaluation: one record of the metrics, one entry of eval_results.json, one log line. Early
  stopping takes each; a new best is pinned (`pin(step)`: kept by the checkpoints, and saved in this
  step), and patience run out asks to stop.

  Not due at the last step: the run's final evaluation (`evaluate(step, state, final=True)`, from
  `Trainer.fit`) runs while the last checkpoint is written."""

  def __init__(self, steps: int, every: int, held_out: Callable[[Any], dict] | None, generation,
               early_stopping, stop: Stop, pin: Callable[[int], None],
               record: Callable[[int, dict], None], workdir: str, primary: bool = True):
    self.steps, self.eval_every, self.held_out, self.generation = steps, every, held_out, generation
    self.early_stopping, self.stop, self.pin, self.record = early_stopping, stop, pin, record
    self.results_path = os.path.join(workdir, 'eval_results.json')
    self.primary = primary
    self.history: list[dict] = []  # this run's evaluations; eval_results.json appends them
    if early_stopping.stopped_at is not None:
      stop.request('early stopping')  # a resumed run that stopped early trains no further

  def parts(self, step: int, final: bool = False) -> tuple[bool, bool]:
    """Which evaluations are due at `step`: (held-out results, task metrics)."""
    everything = final or step == 0
    loss = self.held_out is not None and (everything or bool(self.eval_every) and
                                          step % self.eval_every == 0)
    tasks = self.generation is not None and (everything or self.generation.due(step))
    return loss, tasks

  def due(self, step: int) -> bool:
    return step != self.steps and any(self.parts(step))

  def __call__(self, info: StepInfo):
    self.evaluate(info.step, info.state)

  def evaluate(self, step: int, state, final: bool = False):
    loss, tasks = self.parts(step, final)
    result = {}
    if loss:
      result.update(self.held_out(state))
    if tasks:
      result.update(self.generation(state.model_params, step))
    if not result:
      return
    self.record(step, result)
    self.history.append({'step': step, **result})
    stopping = self.early_stopping
    if stopping.update(step, result):
      self.pin(step)  # saved in this step if it is not already
    if stopping.stopped_at == step:
      self.stop.request('early stopping')
    if self.primary:
      workdir_lib.write_json(self.results_path, self.history, append_to_existing=True)
      logging.info('eval at step %d: %s', step, ' | '.join(
          f'{k[5:]} {v:.4f}' if k not in ('eval_tokens', 'eval_pairs') else f'{v:.0f} {k[5:]}'
          for k, v in result.items()))


class Preemption(Hook):
  """A SIGTERM or SIGINT (train/preemption.py) asks to stop after the step in flight: every step,
  every host asks whether any host got one (a collective: all hosts stop at the same step).
  `stopped_by` names the signal. The signal handlers are installed only while the loop runs."""

  def __init__(self, stop: Stop):
    self.stop = stop
    self.stopped_by: str | None = None
    self._request: preemption.StopRequest | None = None

  def __enter__(self):
    self._request = preemption.StopRequest().__enter__()
    return self

  def __exit__(self, *exc):
    self._request.__exit__(*exc)

  def __call__(self, info: StepInfo):
    if self._request.should_stop():
      self.stopped_by = self._request.signal_name or 'a signal on another host'
      self.stop.request(self.stopped_by)


class Checkpoints(Hook):
  """Saves the state with this host's input position (`data_position()`): every `every` steps, at
  the last step, at early stopping's best, and at a step after which the loop stops. Before each
  save, the best checkpoint is named (best_checkpoint.json) once its step is on storage."""

  def __init__(self, ckpt, every: int, steps: int, early_stopping, stop: Stop,
               data_position: Callable[[], bytes | None], workdir: str, primary: bool = True,
               last_saved: int | None = None):
    self.ckpt, self.every, self.steps, self.early_stopping, self.stop = (
        ckpt, every, steps, early_stopping, stop)
    self.data_position, self.workdir, self.primary = data_position, workdir, primary
    self.last_saved = last_saved  # the step of the last save (in flight or done)

  def due(self, step: int) -> bool:
    return (step % self.every == 0 or step == self.steps or bool(self.stop)
            or step == self.early_stopping.best_step)

  def __call__(self, info: StepInfo):
    self.ckpt.wait()  # the previous save is on storage now: the best may be named
    if self.primary:
      self.early_stopping.publish(self.workdir, self.ckpt.directory)
    self.ckpt.save(info.step, info.state, self.data_position())
    self.last_saved = info.step

  def settle(self) -> int | None:
    """Waits for the save in flight (raising if it failed); returns the step of the last checkpoint."""
    self.ckpt.wait()
    return self.last_saved

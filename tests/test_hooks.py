"""The loop's hooks, each on its own cadence (train/hooks.py), and the loop that runs them: with fakes
for the device, the checkpointer and the evaluations, so nothing is compiled."""

import json
import os
import pathlib
import signal
import types

import ml_collections
import numpy as np
import pytest

from configs import default
from train import evaluation, hooks, loop

pytestmark = pytest.mark.unit


def _info(step, **metrics):
  return hooks.StepInfo(step, types.SimpleNamespace(model_params=f'params@{step}'), metrics)


def _due(hook, steps):
  return [s for s in steps if hook.due(s)]


class FakeCheckpointer:
  directory = pathlib.Path('/nowhere')

  def __init__(self):
    self.saved, self.waits, self.pinned = [], 0, None

  def wait(self):
    self.waits += 1

  def save(self, step, state, data_state):
    self.saved.append((step, data_state))

  def pin(self, step):
    self.pinned = step


def _early_stopping(**settings):
  c = default.get_config()
  c.train.early_stopping.update(settings)
  return evaluation.EarlyStopping(c, ['eval_loss', 'eval_exact_match'])


def test_logging_writes_window_means_every_log_every_steps_and_at_the_last():
  written = []
  log = hooks.Logging(steps=10, log_every=4, tokens_per_step=64, flops_per_step=1e9, peak_tflops=None,
                      record=lambda step, m: written.append((step, m)), primary=False)
  assert [s for s in range(1, 11) if log.writes(s)] == [4, 8, 10]
  assert _due(log, range(1, 11)) == list(range(1, 11))  # it keeps every step's metrics
  for step in range(1, 11):
    log(_info(step, loss=np.float32(step), tokens=np.int32(10), skipped=np.int32(step == 6)))
  assert [s for s, _ in written] == [4, 8, 10]
  (_, first), (_, second), (_, last) = written
  assert (first['loss'], first['tokens'], first['skipped']) == (2.5, 40, 0)
  assert (second['loss'], second['tokens'], second['skipped']) == (6.5, 40, 1)
  assert (last['loss'], last['tokens']) == (9.5, 20)
  # Throughput over the steps after the first (compilation): the first window has 3, the others all.
  assert all('step_time_ms' in m and 'tokens_per_sec' in m for _, m in written)
  assert 'mfu' not in first  # no peak known for this chip


def test_logging_a_window_of_only_the_first_step_has_no_throughput():
  written = []
  log = hooks.Logging(steps=3, log_every=1, tokens_per_step=64, flops_per_step=1e9, peak_tflops=100.,
                      record=lambda step, m: written.append(m), data_stats=lambda: {'documents': 7},
                      primary=False)
  for step in (1, 2):
    log(_info(step, loss=np.float32(1)))
  assert 'step_time_ms' not in written[0] and 'mfu' in written[1]
  assert written[0]['data/documents'] == 7


def test_nonfinite_guard_counts_skips_in_a_row_and_raises_past_the_limit():
  settled = []
  guard = hooks.NonFiniteGuard(max_skips=2, settle=lambda: settled.append(True) or 5)
  for step, skipped in enumerate([0, 1, 1, 0, 1, 1], start=1):
    guard(_info(step, loss=np.float32(np.nan if skipped else 1), skipped=np.int32(skipped)))
  assert guard.consecutive == 2 and not settled  # a finite step in between started the count again
  with pytest.raises(hooks.TrainingDiverged, match=r'3 consecutive steps \(up to step 7\) had a '
                                                   r'non-finite loss.*max_consecutive_skips = 2\)\. '
                                                   r'The last checkpoint, step 5, is intact'):
    guard(_info(7, loss=np.float32(np.nan), skipped=np.int32(1)))
  assert settled == [True]  # the save in flight was waited for before naming it
  assert loop.TrainingDiverged is hooks.TrainingDiverged
  guard(_info(8, loss=np.float32(1)))  # a step without the metric: nothing to count


class FakeGeneration:
  metrics = ['exact_match']

  def __init__(self, every):
    self.every, self.calls = every, []

  def due(self, step):
    return step % self.every == 0

  def __call__(self, params, step):
    self.calls.append((params, step))
    return {'eval_exact_match': float(step)}


def test_evaluation_is_due_at_either_cadence_but_not_at_the_last_step(tmp_path):
  generation, losses = FakeGeneration(every=3), []
  stop = hooks.Stop()
  ev = hooks.Evaluation(12, 4, lambda state: losses.append(state) or {'eval_loss': 1.0}, generation,
                        _early_stopping(), stop, pin=None, record=lambda *a: None,
                        workdir=str(tmp_path))
  assert _due(ev, range(1, 13)) == [3, 4, 6, 8, 9]  # 12 is the final evaluation's, from fit()
  assert [ev.parts(s) for s in (0, 3, 4, 12)] == [(True, True), (False, True), (True, False),
                                                  (True, True)]
  assert ev.parts(5, final=True) == (True, True)
  no_held_out = hooks.Evaluation(12, 4, None, None, _early_stopping(), stop, None, None, str(tmp_path))
  assert _due(no_held_out, range(13)) == [] and not any(no_held_out.parts(0))
  assert not hooks.Evaluation(12, 0, lambda s: {}, None, _early_stopping(), stop, None, None,
                              str(tmp_path)).due(4)  # eval_every 0: only at the end


def test_evaluation_writes_one_record_per_step_pins_the_best_and_stops_early(tmp_path):
  records, ckpt, stop = [], FakeCheckpointer(), hooks.Stop()
  losses = iter([3.0, 2.0, 2.5, 2.4])
  ev = hooks.Evaluation(20, 2, lambda state: {'eval_loss': next(losses)}, FakeGeneration(every=4),
                        _early_stopping(metric='eval_loss', patience=2), stop, ckpt.pin,
                        lambda step, m: records.append((step, m)), str(tmp_path))
  ev.evaluate(0, types.SimpleNamespace(model_params=None))  # all, and not a candidate for the best
  for step in (2, 4):
    ev(_info(step))
    assert ckpt.pinned == 2 and not stop
  ev(_info(6))
  assert records[1:] == [(2, {'eval_loss': 2.0}), (4, {'eval_loss': 2.5, 'eval_exact_match': 4.0}),
                         (6, {'eval_loss': 2.4})]
  assert records[0][0] == 0 and set(records[0][1]) == {'eval_loss', 'eval_exact_match'}
  with open(tmp_path / 'eval_results.json') as f:
    assert [e['step'] for e in json.load(f)] == [0, 2, 4, 6]
  assert stop.reasons == ['early stopping']  # at step 6: two evaluations without a new best
  ckpts = hooks.Checkpoints(FakeCheckpointer(), 5, 20, ev.early_stopping, stop, lambda: None,
                            str(tmp_path))
  assert ckpts.due(2) and ckpts.due(6)  # the best, and the step the loop stops after
  # A resumed run that had stopped early asks to stop before its first step.
  again = hooks.Stop()
  hooks.Evaluation(20, 2, None, None, ev.early_stopping, again, None, None, str(tmp_path))
  assert again.reasons == ['early stopping']


def test_checkpoints_every_steps_at_the_last_the_best_and_on_stop(tmp_path):
  ckpt, stop, best = FakeCheckpointer(), hooks.Stop(), _early_stopping()
  saves = hooks.Checkpoints(ckpt, 5, 12, best, stop, lambda: b'position', str(tmp_path), last_saved=3)
  assert _due(saves, range(1, 13)) == [5, 10, 12]
  best.best_step = 7
  assert _due(saves, range(1, 13)) == [5, 7, 10, 12]
  assert saves.settle() == 3  # the resumed-from step, until a save
  saves(_info(5))
  assert ckpt.saved == [(5, b'position')] and saves.settle() == 5
  stop.request('SIGTERM')
  assert saves.due(8)


def test_preemption_asks_to_stop_on_a_signal_only_while_the_loop_runs():
  before, stop = signal.getsignal(signal.SIGTERM), hooks.Stop()
  hook = hooks.Preemption(stop)
  with hook:
    hook(_info(1))
    assert not stop and hook.stopped_by is None
    os.kill(os.getpid(), signal.SIGTERM)
    hook(_info(2))
  assert stop.reasons == ['SIGTERM'] and hook.stopped_by == 'SIGTERM'
  assert signal.getsignal(signal.SIGTERM) is before


class Calls(hooks.Hook):

  def __init__(self, name, order, every=1, stop_at=None, stop=None):
    self.name, self.order, self.every, self.stop_at, self.stop = name, order, every, stop_at, stop

  def __call__(self, info):
    self.order.append((info.step, self.name))
    if info.step == self.stop_at:
      self.stop.request(self.name)


def _bare_trainer(steps, order, tmp_path):
  """A Trainer with the loop's parts only: a counter for a state, and a Python function for a step."""
  trainer = loop.Trainer.__new__(loop.Trainer)
  trainer.config = ml_collections.ConfigDict({'train': {'steps': steps}})
  trainer.state, trainer.stop, trainer.ckpt = 0, hooks.Stop(), FakeCheckpointer()
  trainer.train_step = lambda state, batch: (state + 1, {'loss': np.float32(batch)})
  trainer.next_batch = lambda step: 10 * step  # an entry point's own batches
  trainer.preemption = hooks.Preemption(trainer.stop)
  trainer.checkpoints = hooks.Checkpoints(trainer.ckpt, 4, steps, _early_stopping(), trainer.stop,
                                          lambda: None, str(tmp_path))
  trainer.hooks = [Calls('log', order), trainer.preemption, trainer.checkpoints]
  return trainer


def test_an_added_hook_runs_at_its_cadence_before_the_checkpoint_and_may_stop_the_loop(tmp_path):
  order = []
  trainer = _bare_trainer(10, order, tmp_path)
  rollouts = Calls('rollouts', order, every=3)
  trainer.add_hook(rollouts)
  assert trainer.hooks[:3] == [trainer.hooks[0], rollouts, trainer.preemption]
  assert trainer._loop(0) == 10  # pylint: disable=protected-access
  assert [s for s, name in order if name == 'rollouts'] == [3, 6, 9]
  assert order[:4] == [(1, 'log'), (2, 'log'), (3, 'log'), (3, 'rollouts')]
  assert [s for s, _ in trainer.ckpt.saved] == [4, 8, 10]

  order = []
  trainer = _bare_trainer(10, order, tmp_path)
  trainer.add_hook(Calls('reward', order, every=1, stop_at=6, stop=trainer.stop))
  assert trainer._loop(2) == 6  # pylint: disable=protected-access
  assert order[0] == (3, 'log') and trainer.state == 4
  assert [s for s, _ in trainer.ckpt.saved] == [4, 6]  # the step it stopped after is saved
  assert trainer.stop.reasons == ['reward'] and trainer.preemption.stopped_by is None

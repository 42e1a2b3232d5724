"""Bad numbers: a non-finite loss or gradient skips the update, is counted, and too many in a row
stop the run with its last checkpoint intact. NaNs are injected through the data (NaN loss weights
at chosen steps), the way a corrupted batch would bring them."""

import json
import os

import jax
import numpy as np
import pytest

from data.synthetic import SyntheticData, SyntheticIterator
from tests.builders import run_config
from train import checkpoint, loop
from train import run as run_lib

pytestmark = pytest.mark.e2e


class PoisonedIterator(SyntheticIterator):
  """Synthetic batches whose loss weights are NaN at the given (1-based) steps."""

  def __init__(self, poisoned_steps, *args):
    super().__init__(*args)
    self.poisoned_steps = poisoned_steps

  def __next__(self):
    batch = super().__next__()
    if self._step in self.poisoned_steps:  # _step counts batches handed out, so it is the step number
      batch['loss_weights'] = np.full_like(batch['loss_weights'], np.nan)
    return batch


class PoisonedData(SyntheticData):

  def __init__(self, poisoned_steps):
    super().__init__(seed=0, seq_len=32, vocab_size=512)
    self.poisoned_steps = set(poisoned_steps)

  def train_iterator(self, shard_index, shard_count, batch_size):
    return PoisonedIterator(self.poisoned_steps, self.seed, batch_size * shard_count, self.seq_len,
                            self.vocab_size, shard_index, shard_count)


def _config(steps, max_skips=10):
  return run_config(data=dict(format='synthetic'),
                    train=dict(steps=steps, seq_len=32, max_consecutive_skips=max_skips),
                    checkpoint=dict(every_steps=1, keep=10, async_save=False))


def _state(workdir, step, config):
  run = run_lib.Run(config)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=10)
  return jax.device_get(ckpt.restore(step, run.abstract_state())[0])


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
  workdir, config = str(tmp_path / 'run'), _config(steps=5)
  final = loop.train(config, workdir, PoisonedData({3}))
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = {r['step']: r for r in map(json.loads, f) if 'loss' in r}
  assert [records[s]['skipped'] for s in range(1, 6)] == [0, 0, 1, 0, 0]
  assert np.isfinite(final['loss'])
  before, after = _state(workdir, 2, config), _state(workdir, 3, config)
  # Parameters and optimizer state are exactly as before the bad step; only the step count moved on.
  for a, b in zip(jax.tree.leaves((before.params, before.opt_state)),
                  jax.tree.leaves((after.params, after.opt_state))):
    np.testing.assert_array_equal(a, b)
  assert int(after.step) == 3
  changed = _state(workdir, 4, config)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after.params),
                                                       jax.tree.leaves(changed.params)))


def test_too_many_consecutive_skips_stop_the_run(tmp_path):
  workdir, config = str(tmp_path / 'run'), _config(steps=10, max_skips=2)
  with pytest.raises(loop.TrainingDiverged, match=r'3 consecutive steps \(up to step 6\) had a '
                                                  r'non-finite loss.*last checkpoint, step 5, is intact'):
    loop.train(config, workdir, PoisonedData({4, 5, 6}))
  # The latest checkpoint holds the last good parameters (steps 4 and 5 changed nothing).
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=10)
  assert ckpt.latest_step() == 5
  good, latest = _state(workdir, 3, config), _state(workdir, 5, config)
  for a, b in zip(jax.tree.leaves(good.params), jax.tree.leaves(latest.params)):
    np.testing.assert_array_equal(a, b)

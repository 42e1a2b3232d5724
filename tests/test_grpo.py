"""Reinforcement learning from rewards (train.grpo): the rows a rollout becomes, a run end to end with
its rollout metrics, exact resume across a rollout that serves several steps, LoRA sampling from the
one copy of the base, and reward functions that fail before anything is written. The loss's parity
with TRL is tests/test_grpo_objective.py; the sampler's log-probabilities, tests/test_sampler.py."""

import json
import os
import sys
import types

import jax
import numpy as np
import pytest

from configs import default
from data.synthetic import SyntheticData
from model.inference import sampler as sampler_lib
from tests.tokenizers_for_tests import make_sp_tokenizer
from train import grpo, loop
from train.rewards import RewardError

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

VOCAB, SEQ = 400, 64
MODEL = dict(vocab_size=VOCAB, embed_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=128,
             dtype='float32', scan_layers=False)
WORDS = 'alpha beta gamma delta river stone cloud field window garden silver yellow quiet rapid'.split()


@pytest.mark.unit
def test_rows_put_each_completion_after_its_prompt_with_its_advantage():
  rows = grpo.completion_rows([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]],
                              np.array([[-0.5, -0.25, -9.0], [-1.0, -2.0, -3.0]], np.float32),
                              np.array([1.5, -0.5], np.float32), seq_len=6)
  np.testing.assert_array_equal(rows['inputs'], [[5, 6, 7, 1, 0, 0], [8, 3, 4, 0, 0, 0]])
  np.testing.assert_array_equal(rows['targets'], [[6, 7, 1, 2, 0, 0], [3, 4, 9, 0, 0, 0]])
  np.testing.assert_array_equal(rows['segment_ids'], [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(rows['positions'], [[0, 1, 2, 3, 0, 0], [0, 1, 2, 0, 0, 0]])
  # Loss on the targets that are completion tokens, through the last (the end token) and no further.
  np.testing.assert_array_equal(rows['loss_weights'], [[0, 0, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(rows['advantages'], [[0, 0, 1.5, 1.5, 0, 0], [-0.5, -0.5, -0.5, 0, 0, 0]])
  np.testing.assert_array_equal(rows['old_logps'], [[0, 0, -0.5, -0.25, 0, 0], [-1, -2, -3, 0, 0, 0]])
  with pytest.raises(ValueError, match='exceed train.seq_len'):
    grpo.completion_rows([[1] * 5], [[2] * 3], np.zeros((1, 3)), np.zeros(1), seq_len=6)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp('grpo')
  rng = np.random.default_rng(0)
  records = []
  for _ in range(24):
    words = list(rng.choice(WORDS, 3, replace=False))
    records.append({'prompt': 'Last word: ' + ' '.join(words), 'completion': words[-1]})
  path = root / 'prompts.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  return {'root': root, 'tok': make_sp_tokenizer(root / 'sp.model', VOCAB), 'train': str(path)}


@pytest.fixture(scope='module')
def start(files, tmp_path_factory):
  """A checkpoint to improve: 2 steps of pretraining on synthetic data (any model will do)."""
  c = default.get_config()
  c.model.update(MODEL)
  c.data.format = 'synthetic'
  c.train.update(dict(steps=2, batch_size=8, seq_len=SEQ, eval_every=0, eval_at_start=False))
  c.checkpoint.async_save = False
  workdir = str(tmp_path_factory.mktemp('start'))
  loop.train(c, workdir, SyntheticData(0, SEQ, VOCAB))
  return workdir


def _config(files, start, **grpo_settings):
  c = default.get_config()
  c.model.update(MODEL)
  c.init_from = start
  c.train.update(dict(objective='grpo', steps=4, batch_size=8, seq_len=SEQ, log_every=1, eval_every=0,
                      eval_at_start=False))
  c.optimizer.update(dict(lr=1e-2, warmup_steps=0, min_lr_ratio=1.0))
  c.checkpoint.update(dict(async_save=False, every_steps=2))
  c.data.update(dict(format='prompt_completion', train_files=files['train'], tokenizer=files['tok'],
                     chat_template='llama2'))
  # A reward that varies within groups, so that the loss and its gradient are not zero.
  c.grpo.update({**dict(num_generations=4, max_prompt_len=56, max_completion_len=8, temperature=1.0,
                        rewards='tests.test_grpo:length_reward'), **grpo_settings})
  return c


def length_reward(prompts, completions, **_):
  del prompts
  return [len(c) / 10 for c in completions]


def _params(workdir, step):
  from model.weights import params as params_lib  # pylint: disable=import-outside-toplevel
  path = f'{workdir}/checkpoints/{step}'
  return params_lib.load_params_numpy(path, params_lib.load_model_config(path), 'float32')


def _metrics(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]


def test_a_run_samples_scores_and_steps_and_resumes_exactly(files, start, tmp_path):
  # Two steps per rollout: a checkpoint between them keeps the rollout, so the resumed run trains on
  # the same completions.
  whole, resumed = str(tmp_path / 'whole'), str(tmp_path / 'resumed')
  c = _config(files, start, num_iterations=2, beta=0.04)
  c.checkpoint.every_steps = 1
  final = grpo.train(c, whole)
  assert final['step'] == 4 if 'step' in final else True
  rollouts = [m for m in _metrics(whole) if 'reward' in m]
  steps = [m for m in _metrics(whole) if 'loss' in m]
  assert len(rollouts) == 2 and len(steps) == 4  # a rollout per two steps
  for m in rollouts:
    assert 0 < m['completions/mean_length'] <= 8 and 0 <= m['completions/clipped_ratio'] <= 1
    assert m['rewards/tests.test_grpo:length_reward/mean'] == pytest.approx(m['reward'])
    assert m['sampling/tokens_per_sec'] > 0 and m['time/sampling_s'] > 0
  for m in steps:
    assert np.isfinite(m['loss']) and m['grad_norm'] > 0 and 'kl' in m
    if m['step'] % 2:  # a rollout's first step: the sampler and the train step agree on what was sampled
      assert m['sampler_logp_gap'] < 1e-4
    else:  # its second: one update later
      assert m['sampler_logp_gap'] > 1e-3
  c.train.steps = 3  # stops between a rollout's two steps
  grpo.train(c, resumed)
  c.train.steps = 4
  grpo.train(c, resumed)
  for step in (3, 4):
    a, b = _params(whole, step), _params(resumed, step)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)
  assert [m['loss'] for m in _metrics(resumed) if 'loss' in m][-1] == steps[-1]['loss']


def test_lora_samples_from_the_one_copy_of_the_base(files, start, tmp_path, monkeypatch):
  seen = []
  original = sampler_lib.Sampler.sample

  def sample(self, params, *args, **kwargs):
    seen.append(params)
    return original(self, params, *args, **kwargs)
  monkeypatch.setattr(sampler_lib.Sampler, 'sample', sample)
  trainers, bases = [], []
  monkeypatch.setattr(grpo.GrpoTrainer, 'fit', lambda self: trainers.append(self) or
                      loop.Trainer.fit(self))
  rollout = grpo.GrpoTrainer.rollout

  def recording_rollout(self, index):
    bases.append({id(x) for x in jax.tree.leaves(self.state.frozen)})  # the base as the rollout starts
    return rollout(self, index)
  monkeypatch.setattr(grpo.GrpoTrainer, 'rollout', recording_rollout)
  c = _config(files, start, beta=0.1)
  c.lora.update(dict(rank=4, targets='q,v'))
  c.train.steps = 2
  grpo.train(c, str(tmp_path / 'lora'))
  # The sampler reads the state's base arrays themselves, not a copy (the train step returns new array
  # objects each step, so the comparison is with the base of the same rollout).
  assert len(bases) == len(seen) == 2 and bases[-1] <= {id(x) for x in jax.tree.leaves(seen[-1])}
  assert trainers[0].state.reference is None  # the reference is the base with adapters off


def test_a_failing_reward_function_fails_before_anything_is_written(files, start, tmp_path, monkeypatch):
  module = types.ModuleType('broken_rewards')
  module.raises = lambda prompts, completions, **_: [1.0 / 0 for _ in completions]
  module.short = lambda prompts, completions, **_: [1.0]
  monkeypatch.setitem(sys.modules, 'broken_rewards', module)
  for name, message in (('broken_rewards:raises', r'reward function broken_rewards:raises raised '
                         r'ZeroDivisionError: .* of .*prompts.jsonl:\d+ \.\. .*prompts.jsonl:\d+'),
                        ('broken_rewards:short', r'returned 1 values for 4 completions')):
    workdir = tmp_path / name.split(':')[1]
    with pytest.raises(RewardError, match=message):
      grpo.train(_config(files, start, rewards=name), str(workdir))
    assert not (workdir / 'config.json').exists() and not (workdir / 'checkpoints').exists()

"""Preference tuning (train.dpo) without torch: the pairs' rows (completion tokens only carry loss,
both sides of a pair in one row), truncation and bad records, exact resume with the reference
log-probabilities precomputed and in the step, and LoRA, whose reference is the base with the adapters
off. TRL parity is tests/test_dpo_parity.py."""

import concurrent.futures
import json
import os
import re

import jax
import numpy as np
import pytest

from data.preference import PreferenceData
from data.records import BadRecord
from model import Transformer
from model.weights import params as params_lib
from tests.builders import MICRO, losses as _losses, run_config
from tests.cli import run_cli
from tests.tokenizers_for_tests import make_hf_tokenizer
from train import dpo, reference_pass, run as run_lib, start as start_lib, step, validate

pytestmark = pytest.mark.unit

VOCAB, SEQ = 400, 128  # the tokenizer's vocabulary; the model's is the micro model's (512)
MODEL = dict(MICRO, dtype='float32', scan_layers=False)  # as conftest.py's micro_checkpoint
WORDS = 'alpha beta gamma delta river stone cloud field window garden silver yellow quiet rapid'.split()


def _user(text):
  return [{'role': 'user', 'content': text}]


def _answer(text):
  return [{'role': 'assistant', 'content': text}]


def _records(n=24):
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    words = list(rng.choice(WORDS, 4, replace=False))
    out.append({'prompt': _user('Last word: ' + ' '.join(words)), 'chosen': _answer(words[-1]),
                'rejected': _answer(words[0])})
  # Plain strings (TRL's standard format), and an implicit prompt (the conversations' shared start).
  out.append({'prompt': 'Say yes', 'chosen': 'yes', 'rejected': 'no'})
  out.append({'chosen': _user('Pick one') + _answer('this one'), 'rejected': _user('Pick one') + _answer('that')})
  return out


def _write(path, records):
  with open(path, 'w') as f:
    f.writelines((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in records)
  return str(path)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp('dpo')
  return {'root': root, 'tok': make_hf_tokenizer(root / 'tok', VOCAB, 'llama3'),
          'train': _write(root / 'train.jsonl', _records()),
          'eval': _write(root / 'eval.jsonl', _records(8)[:8])}


def _config(files, **data):
  # A constant learning rate, its schedule's length fixed: runs of 2 and 4 steps compile the same step.
  return run_config(model=MODEL, train=dict(objective='dpo', steps=4, seq_len=SEQ, eval_every=2,
                                            eval_max_batches=1),
                    optimizer=dict(lr=1e-3, warmup_steps=0, min_lr_ratio=1.0, decay_steps=4),
                    checkpoint=dict(async_save=False, every_steps=2),
                    data={**dict(format='preference', train_files=files['train'], eval_files=files['eval'],
                                 tokenizer=files['tok'], chat_template='llama3'), **data})


@pytest.fixture(scope='module')
def start(micro_checkpoint):
  """A checkpoint to align: the micro model after 2 steps of pretraining (any trained model will do)."""
  return micro_checkpoint


def test_rows_hold_whole_pairs_and_weigh_completion_tokens_only(files):
  data = PreferenceData(_config(files).data, SEQ)
  tok = data.tokenizer
  assert len(data.train_pairs) == 26 and len(data.eval_pairs) == 8 and not data.stats()
  seen = 0
  for batch in data.ordered_batches('train_pass', 0, 1, 8):
    for row in range(8):
      b = {k: v[row] for k, v in batch.items()}
      for pair in set(b['pair_ids'][b['pair_ids'] > 0].tolist()):
        sides = [(b['pair_ids'] == pair) & (b['chosen'] == c) for c in (1, 0)]
        assert all(s.any() for s in sides)  # both sides in the row
        # Each side is one segment; its weighted targets are the answer and the end of the turn.
        answers = [tok.decode(b['targets'][s & (b['loss_weights'] > 0)].tolist()) for s in sides]
        assert all(len(set(b['segment_ids'][s].tolist())) == 1 for s in sides)
        record = _records()[b['example_ids'][sides[0]][0]]
        expected = [record[k][-1]['content'] if isinstance(record[k], list) else record[k]
                    for k in ('chosen', 'rejected')]
        assert answers == expected
        eot = tok.special_tokens()['<|eot_id|>']
        assert all(b['targets'][s & (b['loss_weights'] > 0)][-1] == eot for s in sides)
        seen += 1
  assert seen == 26


@pytest.mark.parametrize('line,problem', [
    ({'prompt': 'q', 'rejected': 'no'}, "missing field 'chosen'"),
    ({'prompt': 'q', 'chosen': 'same', 'rejected': 'same'}, 'chosen and rejected are identical'),
    ({'prompt': 'q', 'chosen': '  ', 'rejected': 'no'}, 'chosen is an empty completion'),
    ({'prompt': 'q', 'chosen': [], 'rejected': 'no'}, 'chosen is an empty completion'),
    ('{"prompt": "q", "chosen": ', 'JSON'),
])
def test_bad_records_name_file_and_line(files, tmp_path, line, problem):
  path = _write(tmp_path / 'bad.jsonl', [{'prompt': 'q', 'chosen': 'yes', 'rejected': 'no'}, line])
  c = _config(files, train_files=path, eval_files='')
  with pytest.raises(BadRecord, match=rf'bad.jsonl:2\b.*{problem}'):
    PreferenceData(c.data, SEQ)
  c.data.skip_bad_records = True
  data = PreferenceData(c.data, SEQ)
  assert len(data.train_pairs) == 1 and data.stats()['train_skipped_bad_records'] == 1


def test_long_prompts_are_truncated_or_dropped_and_counted(files, tmp_path):
  long = {'prompt': ' '.join(WORDS * 4), 'chosen': 'yes', 'rejected': 'no'}
  path = _write(tmp_path / 'long.jsonl', [long, {'prompt': 'q', 'chosen': 'yes', 'rejected': 'no'}])
  c = _config(files, train_files=path, eval_files='', max_prompt_len=40)
  data = PreferenceData(c.data, SEQ)
  assert data.stats()['train_prompt_truncated'] == 1 and len(data.train_pairs) == 2
  ids, mask, n_chosen = data.train_pairs[0]
  assert int(np.argmax(mask[:n_chosen])) == 40  # the prompt's last 40 tokens, then the answer
  c.data.overlong = 'drop'
  data = PreferenceData(c.data, SEQ)
  assert data.stats()['train_dropped_overlong'] == 1 and len(data.train_pairs) == 1


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize('reference', ['precompute', 'step'])
def test_dpo_resumes_exactly(files, start, tmp_path, monkeypatch, reference):
  def train(workdir, steps):
    c = _config(files)
    c.train.steps, c.init_from, c.dpo.reference = steps, start, reference
    if reference == 'step':  # held-out pairs once, with the precomputed table (one compile less per run)
      c.data.eval_files = ''
    return dpo.train(c, workdir)

  straight, interrupted = str(tmp_path / 'straight'), str(tmp_path / 'interrupted')
  last = train(straight, 4)
  train(interrupted, 2)
  if reference == 'precompute':  # the resumed run reads the table: no second reference pass
    monkeypatch.setattr(reference_pass, 'compute', lambda *a: pytest.fail('reference pass on resume'))
  resumed = train(interrupted, 4)
  a, b = _losses(straight), _losses(interrupted)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  assert [b[s] for s in a] == [a[s] for s in a]
  assert {k: resumed[k] for k in ('loss', *step.PAIR_METRICS)} == {k: last[k] for k in ('loss', *step.PAIR_METRICS)}
  for key in step.PAIR_METRICS:
    assert np.isfinite(last[key]), key
  if reference == 'step':
    return
  # Resumed with other pairs and another starting model: refused before the saved table is touched,
  # by the config check, and, told to override it, because the new pairs' reference must be the start.
  table = tmp_path / 'interrupted' / reference_pass.REFERENCE_LOGPS
  before = table.read_text()
  c = _config(files, eval_files='')
  c.train.steps, c.init_from, c.dpo.reference = 6, straight, 'precompute'
  with pytest.raises(validate.ConfigError, match='different config'):
    dpo.train(c, interrupted)
  c.train.override_workdir_config = True
  with pytest.raises(validate.ConfigError, match=re.escape(f'resume with --config.init_from={start}')):
    dpo.train(c, interrupted)
  assert table.read_text() == before
  # A fresh run (no checkpoint yet) that finds a table of another starting model computes it again.
  fresh = tmp_path / 'fresh'
  fresh.mkdir()
  (fresh / reference_pass.REFERENCE_LOGPS).write_text(before)
  c = _config(files)
  c.init_from, c.dpo.reference = straight, 'precompute'
  monkeypatch.setattr(reference_pass, 'compute', lambda r, data, *model: np.full((len(
      data.train_pairs) + len(data.eval_pairs), 2), -1.0, np.float32))
  data = PreferenceData(c.data, SEQ)
  run = run_lib.Run(c, tokenizer_vocab=data.vocab_size)
  reference_pass.table(run, c, str(fresh), start_lib.resolve(run, c, str(fresh)), data)
  assert json.loads((fresh / reference_pass.REFERENCE_LOGPS).read_text())['init_from'] == straight
  # Training moved the policy away from its reference: the held-out pairs are told apart.
  with open(os.path.join(straight, 'eval_results.json')) as f:
    evals = json.load(f)
  assert [e['step'] for e in evals] == [2, 4] and evals[-1]['eval_pairs'] == 8
  assert evals[-1]['eval_rewards/accuracies'] > 0.5 and evals[-1]['eval_loss'] < np.log(2)


def test_a_run_is_assembled_once(files, start, tmp_path, monkeypatch):
  """A fresh DPO run builds one Run and reads init_from's parameters once: the reference pass runs on
  the trainer's Run and starting state."""
  built, read = [], []
  build, load = run_lib.Run.__init__, params_lib.load_params
  monkeypatch.setattr(run_lib.Run, '__init__', lambda self, *a, **k: built.append(1) or build(self, *a, **k))
  monkeypatch.setattr(params_lib, 'load_params', lambda path, *a: read.append(path) or load(path, *a))
  c = _config(files)
  c.train.steps, c.init_from = 1, start
  metrics = dpo.train(c, str(tmp_path / 'run'))
  assert len(built) == 1 and read == [start]
  assert (tmp_path / 'run' / reference_pass.REFERENCE_LOGPS).exists() and 'eval_loss' in metrics


def test_a_failing_run_prints_one_error_line(files, start, tmp_path):
  """train.dpo ends as every command does (runtime.run): a missing init_from, or a bad pair, is one
  `error:` line naming it, with no traceback."""
  bad = _write(tmp_path / 'bad.jsonl', [{'prompt': 'q', 'chosen': 'yes', 'rejected': 'no'},
                                        {'prompt': 'q', 'rejected': 'no'}])
  common = ['--config=configs/dpo_tiny.py', f'--config.data.tokenizer={files["tok"]}',
            '--config.data.chat_template=llama3', '--config.data.eval_files=']
  cases = [
      ([f'--config.init_from={tmp_path / "missing"}', f'--config.data.train_files={files["train"]}'],
       f'config.init_from: No checkpoint at {tmp_path / "missing"}'),
      ([f'--config.init_from={start}', f'--config.data.train_files={bad}'],
       f"{bad}:2: missing field 'chosen'"),
  ]
  dpo_cli = lambda i: run_cli('train.dpo', f'--workdir={tmp_path / f"run{i}"}', *common, *cases[i][0])
  with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
    results = list(pool.map(dpo_cli, range(len(cases))))
  for (_, expected), proc in zip(cases, results):
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if line.startswith('error: ')]
    assert proc.returncode == 1 and len(errors) == 1, out[-3000:]
    assert expected in errors[0] and 'Traceback' not in out, out[-3000:]


@pytest.mark.slow
def test_the_two_references_give_the_same_step(files, start):
  """The reference in the step and the precomputed table give the same loss and gradients."""
  metrics = {}
  for reference in ('precompute', 'step'):
    c = _config(files)
    c.init_from, c.dpo.reference = start, reference
    data = PreferenceData(c.data, SEQ)
    run = run_lib.Run(c, tokenizer_vocab=data.vocab_size)
    begin = start_lib.load_init_from(run, start)
    table = None
    if reference == 'precompute':
      table = reference_pass.compute(run, data, *start_lib.starting_model(run, c, begin))
    batch = reference_pass.join(next(data.ordered_batches('train_pass', 0, 1, 8)), table)
    metrics[reference] = jax.device_get(run.train_step()(begin.state, run.global_batch(batch))[1])
  for key in ('loss', 'grad_norm', *step.PAIR_METRICS):
    np.testing.assert_allclose(metrics['precompute'][key], metrics['step'][key], rtol=1e-5, atol=1e-6,
                               err_msg=key)
  assert metrics['step']['loss'] == pytest.approx(np.log(2), abs=1e-6)  # policy == reference


def test_lora_reference_is_the_base_with_adapters_off(files, start):
  c = _config(files)
  c.init_from, c.dpo.reference = start, 'step'
  c.lora.update(dict(rank=4, alpha=8.0, targets='q,v'))
  data = PreferenceData(c.data, SEQ)
  run = run_lib.Run(c, tokenizer_vocab=data.vocab_size)
  assert not run.reference_in_state  # no second copy of the weights
  state = start_lib.load_init_from(run, start).state
  assert state.reference is None and state.reference_params is state.frozen
  # Adapters that are not zero: the reference must still be the base alone.
  state = state.replace(params=jax.tree.map(lambda x: x + 0.05, state.params))
  batch = reference_pass.join(next(data.ordered_batches('train_pass', 0, 1, 8)), None)
  base = params_lib.load_params(start, run_lib.Run(_config(files)).abstract_state().params)
  plain = Transformer(run.model_config)
  expected = step.pair_logps(plain, base, batch)[0]
  ours = step.pair_logps(run.objective.reference_model, state.reference_params, batch)[0]
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-4)
  with_adapters = step.pair_logps(run.model, state.model_params, batch)[0]
  assert np.abs(np.asarray(with_adapters) - np.asarray(expected)).max() > 1e-3
  # The precomputed table is the same numbers, from the frozen base.
  c.dpo.reference = 'precompute'
  run = run_lib.Run(c, tokenizer_vocab=data.vocab_size)
  begin = start_lib.load_init_from(run, start)
  assert not begin.adapters_from_init
  table = reference_pass.compute(run, data, *start_lib.starting_model(run, c, begin))
  present = np.asarray(step.pair_logps(plain, base, batch)[1])[..., 0] > 0
  np.testing.assert_allclose(table[_pair_indices(data)], np.asarray(expected)[present], rtol=1e-5,
                             atol=1e-4)


def _pair_indices(data):
  """The index (`example_ids`) of each pair of the first training batch, in slot order."""
  batch = next(data.ordered_batches('train_pass', 0, 1, 8))
  return [int(batch['example_ids'][row][batch['pair_ids'][row] == pair][0])
          for row in range(batch['pair_ids'].shape[0]) for pair in range(1, batch['pair_ids'][row].max() + 1)]


def test_config_errors(files):
  c = _config(files)
  c.dpo.loss = 'kto'
  c.train.z_loss = 1e-4
  with pytest.raises(validate.ConfigError, match=r"(?s)dpo.loss must be one of .*train.z_loss"):
    run_lib.Run(c)
  c = _config(files)
  with pytest.raises(validate.ConfigError, match='set config.init_from'):
    dpo.train(c, '/tmp/unused')

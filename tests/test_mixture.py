"""Weighted mixtures: rows come from each source in proportion to its weight, hosts draw their own
share, the position in every source resumes exactly, the trainer logs tokens per source (and keeps
counting after a restart); data.inspect shows the rows and the shares; bad mixture configs are named."""

import json
import os
import re

import numpy as np
import pytest

from configs import sft_tiny, tiny
from data import config as data_config
from data import demo_corpus, mixture
from data import inspect as inspect_lib
from data.iterator import DatasetIterator
from data.pretrain import PretrainData
from data.sft import SFTData
from tests.cli import run_cli
from tests.test_parquet import write_jsonl, write_parquet

pytestmark = pytest.mark.unit

WEIGHTS = {'books': 0.2, 'code': 0.3, 'web': 0.5}
SEQ = 32


@pytest.fixture(scope='module')
def sources_dir(demo_data, tmp_path_factory):
  """Three sources in three formats, cut from the demo corpus: web (Parquet), code (JSONL with a
  `content` field), books (a document per line)."""
  root = tmp_path_factory.mktemp('mixture')
  with open(demo_data['train']) as f:
    texts = [json.loads(line)['text'] for line in f]
  for i in range(2):
    write_parquet(root / f'web-{i}.parquet', [{'text': t} for t in texts[i:1200:2]], rows_per_group=100)
  write_jsonl(root / 'code.jsonl', [{'content': t} for t in texts[1200:1800]])
  (root / 'books.txt').write_text(''.join(' '.join(t.split()) + '\n' for t in texts[1800:]))
  return root


def mixture_config(demo_data, root, weights=None):
  c = tiny.get_config()
  c.data.update(dict(train_files='', eval_files='', tokenizer=demo_data['tokenizer'], shuffle_buffer=32))
  weights = weights or WEIGHTS
  c.data.mixture.web = data_config.source(weights['web'], format='parquet',
                                          train_files=str(root / 'web-*.parquet'))
  c.data.mixture.code = data_config.source(weights['code'], train_files=str(root / 'code.jsonl'),
                                           text_field='content', eval_files=str(root / 'code.jsonl'))
  c.data.mixture.books = data_config.source(weights['books'], format='lines',
                                            train_files=str(root / 'books.txt'))
  return c


def _sources_of_rows(data, shard_index, shard_count, batches, batch_size=50):
  it = DatasetIterator(data.dataset('train', shard_index, shard_count, batch_size))
  return np.concatenate([next(it)['source'] for _ in range(batches)])


def _within_sampling_error(rows, weights):
  """Each source's share of rows within 4 standard deviations of a binomial draw with its weight."""
  n = len(rows)
  for i, w in enumerate(weights):
    assert abs((rows == i).sum() - n * w) < 4 * np.sqrt(n * w * (1 - w)), ((rows == i).sum(), n, w)


def test_mixture_proportions_follow_the_weights(demo_data, sources_dir):
  data = PretrainData(mixture_config(demo_data, sources_dir).data, SEQ)
  assert [s.name for s in data.sources] == ['books', 'code', 'web']
  rows = _sources_of_rows(data, 0, 1, batches=40)
  _within_sampling_error(rows, [WEIGHTS[s.name] for s in data.sources])
  # The same seed draws the same rows; each host draws its own share.
  np.testing.assert_array_equal(rows, _sources_of_rows(data, 0, 1, batches=40))
  other_host = _sources_of_rows(data, 1, 2, batches=40)
  assert not np.array_equal(rows, other_host)
  _within_sampling_error(other_host, [WEIGHTS[s.name] for s in data.sources])
  # What the trainer logs: real tokens per source, the rows' tokens (pretraining rows are full).
  it = data.train_iterator(0, 1, 50)
  for _ in range(40):
    next(it)
  assert data.stats() == {f'tokens/{s.name}': int((rows == i).sum()) * SEQ
                          for i, s in enumerate(data.sources)}


def test_mixture_resumes_exactly(demo_data, sources_dir):
  config = mixture_config(demo_data, sources_dir).data
  data = PretrainData(config, SEQ)
  it = data.train_iterator(0, 1, 8)
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(5)]
  counts = data.stats()
  fresh = PretrainData(config, SEQ)  # a new process would build this, then restore the checkpoint
  resumed = fresh.train_iterator(0, 1, 8)
  resumed.set_state(state)
  for a, b in zip(expected, [next(resumed) for _ in range(5)]):
    assert a.keys() == b.keys() == {'inputs', 'targets', 'segment_ids', 'positions', 'loss_weights'}
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert fresh.stats() == counts and sum(counts.values()) == 12 * 8 * SEQ
  assert not np.array_equal(next(PretrainData(config, SEQ).train_iterator(0, 1, 8))['inputs'],
                            expected[0]['inputs'])


def test_sft_mixture(demo_data, tmp_path):
  """Two instruction sets, chat JSONL and Alpaca Parquet, weighted 3:1; exact resume."""
  demo_corpus.write_instruction_task(os.path.join(demo_data['dir'], 'data'), str(tmp_path), 300, 20)
  with open(tmp_path / 'train.jsonl') as f:
    chats = [json.loads(line) for line in f]
  alpaca = [{'instruction': c['messages'][0]['content'], 'output': c['messages'][1]['content']}
            for c in chats[:150]]
  c = sft_tiny.get_config()
  c.data.update(dict(train_files='', eval_files='', tokenizer=demo_data['tokenizer']))
  c.data.mixture.chat = data_config.source(3, train_files=str(tmp_path / 'train.jsonl'),
                                           eval_files=str(tmp_path / 'eval.jsonl'))
  c.data.mixture.tasks = data_config.source(1, format='alpaca', train_files=write_parquet(
      tmp_path / 'alpaca.parquet', alpaca, rows_per_group=64))
  data = SFTData(c.data, 128)
  assert [len(x) for x in data.train_sets] == [300, 150] and len(data.eval_examples) == 20
  _within_sampling_error(_sources_of_rows(data, 0, 1, batches=12, batch_size=50), [0.75, 0.25])
  it = data.train_iterator(0, 1, 4)
  first = [next(it) for _ in range(3)]
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = SFTData(c.data, 128).train_iterator(0, 1, 4)
  resumed.set_state(state)
  for a, b in zip(expected, [next(resumed) for _ in range(3)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  tokens = data.stats()
  assert set(tokens) == {'tokens/chat', 'tokens/tasks'}
  assert sum(tokens.values()) == sum(int((b['segment_ids'] > 0).sum()) for b in first + expected)
  assert len(data.eval_batches(0, 1, 4, max_batches=0)) >= 1


@pytest.mark.e2e
def test_trainer_logs_tokens_per_source_and_keeps_counting_after_a_restart(demo_data, sources_dir,
                                                                          tmp_path):
  from train import loop  # pylint: disable=import-outside-toplevel
  c = mixture_config(demo_data, sources_dir)
  c.model.update(dict(vocab_size=512, embed_dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                      mlp_dim=64))
  c.train.update(dict(steps=2, batch_size=8, seq_len=SEQ, log_every=1, eval_at_start=False,
                      eval_every=0, eval_max_batches=1))
  c.checkpoint.update(dict(every_steps=2, async_save=False))
  workdir = str(tmp_path / 'run')
  loop.train(c, workdir, PretrainData(c.data, SEQ))
  c.train.steps = 3
  loop.train(c, workdir, PretrainData(c.data, SEQ))  # resumes at step 2
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    logged = [json.loads(line) for line in f]
  per_step = {m['step']: {k: v for k, v in m.items() if k.startswith('data/tokens/')} for m in logged
              if any(k.startswith('data/tokens/') for k in m)}
  assert set(per_step[1]) == {'data/tokens/books', 'data/tokens/code', 'data/tokens/web'}
  for step in (1, 2, 3):
    assert sum(per_step[step].values()) == step * 8 * SEQ  # the rows of every step so far


@pytest.mark.e2e
def test_inspect_shows_rows_segments_and_source_shares(demo_data, sources_dir, tmp_path):
  data = PretrainData(mixture_config(demo_data, sources_dir).data, SEQ)
  rows = inspect_lib.first_rows(data, 'train', 100)
  text = inspect_lib.describe(rows, data.tokenizer, [s.name for s in data.sources],
                              [s.weight for s in data.sources], show=2, max_chars=80)
  lines = text.splitlines()
  assert lines[1].startswith('row 0: 32 tokens, 0 padding') and '  [1] ' in text
  assert '<s>«' in text  # BOS is not learned, the document's tokens are
  assert 'Summary of 100 rows of 32 tokens: 3,200 tokens, 0.0% padding' in text
  shares = [line for line in lines if line.startswith('  source ')]
  assert [s.split(':')[0] for s in shares] == ['  source books', '  source code', '  source web']
  assert sum(float(s.split(': ')[1].split('%')[0]) for s in shares) == pytest.approx(100, abs=0.2)
  # As a command, with the trainers' --config and a command-line change to a source's weight.
  (tmp_path / 'mix.py').write_text(
      'import pathlib\n'
      'from tests.test_mixture import mixture_config\n\n\n'
      'def get_config():\n'
      f'  return mixture_config({demo_data!r}, pathlib.Path({str(sources_dir)!r}))\n')
  proc = run_cli('data.inspect', f'--config={tmp_path / "mix.py"}', '--config.data.mixture.books.weight=1',
                 '--rows=1', '--summary_rows=20', '--split=eval')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Summary of 20 rows of 256 tokens' in proc.stdout
  assert 'source code: 100.0% of tokens (weight 16.7%)' in proc.stdout  # only code has eval files


def test_bad_mixture_configs_are_named(demo_data, sources_dir):
  def sources_of(change):
    c = mixture_config(demo_data, sources_dir)
    change(c.data)
    return mixture.sources(c.data)
  assert [s.weight for s in sources_of(lambda d: None)] == [0.2, 0.3, 0.5]
  for change, error in [
      (lambda d: setattr(d, 'train_files', 'x.jsonl'),
       'config.data.train_files must be empty when config.data.mixture is set'),
      (lambda d: setattr(d.mixture.code, 'weight', 0.0),
       'config.data.mixture.code.weight must be a positive number, got 0.0'),
      (lambda d: setattr(d.mixture.code, 'format', 'chat'),
       "config.data.mixture.code.format is 'chat', but config.data.format 'jsonl' makes this a mixture"),
      (lambda d: setattr(d.mixture.code, 'train_files', ''), 'config.data.mixture.code.train_files is empty'),
      (lambda d: setattr(d.mixture, 'web', d.fields), 'config.data.mixture.web must be a source'),
  ]:
    with pytest.raises(ValueError, match=re.escape(error)):
      sources_of(change)
  with pytest.raises(ValueError, match=re.escape("a mixture source cannot set ['tokenizer']")):
    data_config.source(1.0, tokenizer='x.model')

"""Input pipelines: packing is exact, host shards partition the data, iteration resumes exactly."""

import json

import numpy as np
import pytest
import tensorflow as tf

from configs import tiny
from data import packing, sources
from data.pretrain import PretrainData

pytestmark = pytest.mark.unit


def _char_ids(texts):
  """A stand-in tokenizer: one id per byte, with BOS=1 and EOS=2 around each document."""
  return [[1] + [3 + b for b in t] + [2] for t in texts]


def _rows(docs, seq_len, flush=True):
  ds = packing.token_chunks(_char_ids, tf.data.Dataset.from_tensor_slices(docs), docs_per_chunk=3)
  return list(packing.concat_and_split(ds, seq_len, flush=flush).as_numpy_iterator())


def test_packing_loses_and_duplicates_no_token():
  rng = np.random.default_rng(0)
  docs = [bytes(rng.integers(97, 123, rng.integers(1, 40)).astype(np.uint8)) for _ in range(50)]
  rows = _rows(docs, seq_len=16)
  assert all(len(r['tokens']) == 16 for r in rows)
  stream = np.concatenate([r['tokens'][r['valid'] == 1] for r in rows])
  np.testing.assert_array_equal(stream, np.concatenate([np.array(x) for x in _char_ids(docs)]))
  # Only the very last row has padding.
  assert all(r['valid'].all() for r in rows[:-1])
  # Each document start is marked exactly once.
  assert sum(int(r['starts'].sum()) for r in rows) == len(docs)


def test_row_features():
  # Row 0: a fragment continuing from the previous row, then two documents. Row 1: padded.
  rows = {
      'tokens': tf.constant([[7, 8, 1, 9, 2, 1, 5, 6], [1, 4, 4, 2, 0, 0, 0, 0]]),
      'starts': tf.constant([[0, 0, 1, 0, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]]),
      'valid': tf.constant([[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0, 0]]),
  }
  rows['trainable'] = rows['valid']
  f = {k: v.numpy() for k, v in packing.row_features(rows).items()}
  np.testing.assert_array_equal(f['segment_ids'], [[1, 1, 2, 2, 2, 3, 3, 3], [1, 1, 1, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(f['positions'], [[0, 1, 0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 0, 0, 0]])
  np.testing.assert_array_equal(f['targets'], [[8, 1, 9, 2, 1, 5, 6, 0], [4, 4, 2, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(f['loss_weights'], [[1, 0, 1, 1, 0, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0, 0]])


def _write_docs(tmp_path, n_files, per_file):
  paths, all_docs = [], []
  for i in range(n_files):
    path = tmp_path / f'part-{i}.jsonl'
    docs = [f'document {i}-{j}' for j in range(per_file)]
    path.write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs))
    paths.append(str(path))
    all_docs += docs
  return paths, all_docs


@pytest.mark.parametrize('n_files', [1, 5])  # document-level and file-level sharding
def test_host_shards_are_disjoint_and_complete(tmp_path, n_files):
  paths, all_docs = _write_docs(tmp_path, n_files, per_file=23)
  shards = [
      [d.decode() for d in sources.documents('jsonl', ','.join(paths), shard_index=i, shard_count=3)
       .as_numpy_iterator()]
      for i in range(3)]
  assert all(shards)
  for i in range(3):
    for j in range(i + 1, 3):
      assert not set(shards[i]) & set(shards[j])
  assert sorted(sum(shards, [])) == sorted(all_docs)


def _pretrain_data(demo_data, **overrides):
  c = tiny.get_config()
  c.data.train_files, c.data.eval_files, c.data.tokenizer = (
      demo_data['train'], demo_data['eval'], demo_data['tokenizer'])
  c.data.shuffle_buffer = 64
  for k, v in overrides.items():
    c.data[k] = v
  return PretrainData(c.data, seq_len=64)


def test_train_iterator_resumes_exactly(demo_data):
  data = _pretrain_data(demo_data)
  it = data.train_iterator(0, 1, 4)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  resumed = data.train_iterator(0, 1, 4)
  resumed.set_state(state)
  for a, b in zip(expected, [next(resumed) for _ in range(4)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  fresh = data.train_iterator(0, 1, 4)
  assert not np.array_equal(next(fresh)['inputs'], expected[0]['inputs'])


def test_eval_batches_cover_the_held_out_set_once(demo_data):
  data = _pretrain_data(demo_data)
  batches = data.eval_batches(0, 1, 4, max_batches=0)
  tokens = sum(int((b['segment_ids'] > 0).sum()) for b in batches)
  with open(demo_data['eval']) as f:
    texts = [json.loads(line)['text'] for line in f]
  expected = sum(len(x) + 2 for x in data.tokenizer.encode_batch(texts))
  assert tokens == expected


def test_malformed_jsonl_names_file_and_line(tmp_path):
  path = tmp_path / 'bad.jsonl'
  path.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken}\n')
  with pytest.raises(tf.errors.OpError, match=r'bad.jsonl:3: malformed JSON'):
    list(sources.documents('jsonl', str(path)).as_numpy_iterator())
  path.write_text('{"text": "fine"}\n{"body": "no text"}\n')
  with pytest.raises(tf.errors.OpError, match=r"bad.jsonl:2: JSON record has no 'text' field"):
    list(sources.documents('jsonl', str(path)).as_numpy_iterator())


def test_glob_matching_nothing_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='matched no file'):
    sources.resolve_files(str(tmp_path / 'nothing-*.jsonl'))

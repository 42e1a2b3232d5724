"""Parquet input: the same records give the same batches as JSONL, for pretraining and instruction
tuning; files written by `datasets` read back; hosts share files, row groups or documents; bad input
names file, row group and row."""

import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs import sft_tiny, tiny
from data import config as data_config
from data import demo_corpus, instructions, sources
from data.prompts import PromptData
from data.pretrain import PretrainData
from data.records import BadRecord
from data.sft import SFTData

pytestmark = pytest.mark.unit

try:
  import datasets
except ImportError:  # the test requirements have it; without it pyarrow writes the same tables
  datasets = None


def write_parquet(path, records, rows_per_group):
  """As `datasets` writes a Dataset (to_parquet: one row group per `batch_size` rows), or pyarrow."""
  if datasets is not None:
    datasets.Dataset.from_list(records).to_parquet(str(path), batch_size=rows_per_group)
  else:
    pq.write_table(pa.Table.from_pylist(records), str(path), row_group_size=rows_per_group)
  return str(path)


def write_jsonl(path, records):
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  return str(path)


def _texts(demo_data, n):
  with open(demo_data['train']) as f:
    return [json.loads(line)['text'] for line in f][:n]


@pytest.fixture(scope='module')
def same_records(demo_data, tmp_path_factory):
  """600 documents in three JSONL files and in three Parquet files of several row groups each."""
  root = tmp_path_factory.mktemp('same')
  texts = _texts(demo_data, 600)
  jsonl, parquet = [], []
  for i in range(3):
    part = [{'text': t, 'id': j} for j, t in enumerate(texts[i::3])]
    jsonl.append(write_jsonl(root / f'part-{i}.jsonl', part))
    parquet.append(write_parquet(root / f'part-{i}.parquet', part, rows_per_group=45))
  assert all(pq.ParquetFile(p).metadata.num_row_groups == 5 for p in parquet)
  return {'jsonl': ','.join(jsonl), 'parquet': ','.join(parquet), 'texts': texts}


def _pretrain(demo_data, **data):
  c = tiny.get_config()
  c.data.update(dict(train_files='', eval_files='', tokenizer=demo_data['tokenizer'], shuffle_buffer=64))
  c.data.update(data)
  return PretrainData(c.data, seq_len=64)


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_parquet_and_jsonl_of_the_same_records_give_the_same_batches(demo_data, same_records):
  batches = {}
  for fmt in ('jsonl', 'parquet'):
    data = _pretrain(demo_data, format=fmt, train_files=same_records[fmt], eval_files=same_records[fmt])
    it = data.train_iterator(0, 1, 4)
    batches[fmt] = ([next(it) for _ in range(12)], data.eval_batches(0, 1, 4, max_batches=0))
  _assert_same_batches(batches['jsonl'][0], batches['parquet'][0])  # shuffled, endless
  _assert_same_batches(batches['jsonl'][1], batches['parquet'][1])  # one ordered pass: every document
  tokens = sum(int((b['segment_ids'] > 0).sum()) for b in batches['parquet'][1])
  assert tokens == sum(len(ids) + 2 for ids in data.tokenizer.encode_batch(same_records['texts']))


@pytest.mark.parametrize('n_files,rows_per_group', [
    (5, 10),   # file sharding
    (1, 10),   # one file of 10 row groups: row-group sharding
    (1, 100),  # one row group: document sharding
])
def test_parquet_host_shards_are_disjoint_and_complete(tmp_path, n_files, rows_per_group):
  docs = [f'document {i}' for i in range(97)]
  paths = [write_parquet(tmp_path / f'p{i}.parquet', [{'text': d} for d in docs[i::n_files]],
                         rows_per_group) for i in range(n_files)]
  shards = [[d.decode() for d in sources.documents('parquet', ','.join(paths), shard_index=i,
                                                   shard_count=3).as_numpy_iterator()]
            for i in range(3)]
  assert all(shards) and sorted(sum(shards, [])) == sorted(docs)


def test_remote_parquet_files_are_read_through_etils(tmp_path, monkeypatch):
  """gs:// paths open through etils.epath, whose files there are TensorFlow GFiles (which pyarrow
  cannot take as they are); here a local file stands in for the bucket."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  local = write_parquet(tmp_path / 'data.parquet', [{'text': f'doc {i}'} for i in range(30)], 10)

  class Bucket:
    def __init__(self, path):
      assert path == 'gs://bucket/data.parquet'

    def open(self, mode):
      return tf.io.gfile.GFile(local, mode)

  monkeypatch.setattr(sources.epath, 'Path', Bucket)
  assert sources.parquet_row_groups('gs://bucket/data.parquet', 'text') == 3
  rows, raws = sources.parquet_cells('gs://bucket/data.parquet', 1, 'text')
  assert rows.tolist() == list(range(10)) and raws.tolist() == [f'doc {i}'.encode() for i in range(10, 20)]


@pytest.fixture(scope='module')
def chat_records(demo_data, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('sft'))
  demo_corpus.write_instruction_task(os.path.join(demo_data['dir'], 'data'), out, 300, 30)
  with open(os.path.join(out, 'train.jsonl')) as f:
    return [json.loads(line) for line in f]


def _sft(demo_data, files, **data):
  c = sft_tiny.get_config()
  c.data.update(dict(train_files=files, eval_files='', tokenizer=demo_data['tokenizer']))
  c.data.update(data)
  return SFTData(c.data, 128)


def test_sft_parquet_written_by_datasets_equals_jsonl(demo_data, chat_records, tmp_path):
  """Chat records as `datasets` stores them (messages: a list of {role, content} structs), and
  Alpaca ones, give the examples and batches that the same records in JSONL give."""
  alpaca = [{'instruction': r['messages'][0]['content'], 'output': r['messages'][1]['content']}
            for r in chat_records]
  for fmt, rows in (('chat', chat_records), ('alpaca', alpaca)):
    jsonl = write_jsonl(tmp_path / f'{fmt}.jsonl', rows)
    parquet = write_parquet(tmp_path / f'{fmt}.parquet', rows, rows_per_group=64)
    a, b = _sft(demo_data, jsonl, format=fmt), _sft(demo_data, parquet, format=fmt)
    assert len(a.train_examples) == len(rows) == len(b.train_examples)
    for (ids_a, mask_a), (ids_b, mask_b) in zip(a.train_examples, b.train_examples):
      np.testing.assert_array_equal(ids_a, ids_b)
      np.testing.assert_array_equal(mask_a, mask_b)
    it_a, it_b = a.train_iterator(0, 1, 4), b.train_iterator(0, 1, 4)
    _assert_same_batches([next(it_a) for _ in range(3)], [next(it_b) for _ in range(3)])


def test_records_read_whole_keep_every_parquet_column_as_jsonl_keeps_every_field(demo_data, chat_records,
                                                                                 tmp_path):
  """Evaluation (model.evaluate generate-metrics: each record's `task`) and GRPO prompts (the reward
  functions' columns) read the whole record: from Parquet the same as from JSONL, not only the
  format's columns."""
  rows = chat_records[:40]
  assert all('task' in r for r in rows)
  jsonl = write_jsonl(tmp_path / 'heldout.jsonl', rows)
  parquet = write_parquet(tmp_path / 'heldout.parquet', rows, rows_per_group=16)
  cfg = data_config.get_config()
  cfg.update(dict(format='chat', tokenizer=demo_data['tokenizer'], train_files=jsonl))
  from_jsonl, from_parquet = (instructions.conversations(p, cfg) for p in (jsonl, parquet))
  assert [(m, r) for _, m, r in from_jsonl] == [(m, r) for _, m, r in from_parquet] == [
      (r['messages'], r) for r in rows]
  assert from_parquet[1][0] == f'{parquet}, row group 0, row 1'
  prompts = {}
  for files in (jsonl, parquet):
    cfg.train_files = files
    prompts[files] = [(p.ids, p.columns) for p in PromptData(cfg, 0).prompts]
  assert prompts[jsonl] == prompts[parquet] and prompts[jsonl][0][1]['task'] == rows[0]['task']


def _read(demo_data, path, **data):
  """One ordered pass over a Parquet file (the eval path): (batches, counters)."""
  d = _pretrain(demo_data, format='parquet', eval_files=str(path), shuffle_buffer=1, **data)
  return d.eval_batches(0, 1, 2, max_batches=0), d.stats()


def test_bad_parquet_input_names_file_row_group_and_row(demo_data, tmp_path):
  good = [{'text': f'document number {i}'} for i in range(10)]
  path = tmp_path / 'bad.parquet'
  write_parquet(path, [{'body': 'x'}], 1)
  with pytest.raises(BadRecord, match=re.escape(f"{path}: no column 'text' (set config.data.text_field); "
                                                "columns: ['body']")):
    _read(demo_data, path)
  write_parquet(path, [{'text': 7}], 1)
  with pytest.raises(BadRecord, match=re.escape(f"{path}, row group 0, row 0: column 'text' holds int64, "
                                                'not strings')):
    _read(demo_data, path)
  pq.write_table(pa.Table.from_pylist(good[:7] + [{'text': None}] + good[7:]), path, row_group_size=4)
  with pytest.raises(BadRecord, match=re.escape(f"{path}, row group 1, row 3: column 'text' is null")):
    _read(demo_data, path)
  _, stats = _read(demo_data, path, skip_bad_records=True)
  assert stats == {'skipped_bad_records': 1}
  # Cells go through the one cleaning path of data/records.py: UTF-8, size limit, empty documents.
  cells = [b'fine', b'', b'bad \xff byte', b'x' * 5000]
  pq.write_table(pa.table({'text': pa.array(cells, pa.binary())}), path, row_group_size=2)
  with pytest.raises(BadRecord, match=re.escape(f'{path}, row group 1, row 0: invalid UTF-8 at byte 4 '
                                                'of the record')):
    _read(demo_data, path)
  with pytest.raises(BadRecord, match=re.escape(f'{path}, row group 1, row 1: record of 5,000 bytes '
                                                'exceeds config.data.max_record_bytes (4,096)')):
    _read(demo_data, path, invalid_utf8='replace', max_record_bytes=4096)
  _, stats = _read(demo_data, path, invalid_utf8='replace', max_record_bytes=4096, skip_bad_records=True)
  assert stats == {'invalid_utf8_replaced': 1, 'skipped_bad_records': 1, 'skipped_empty_documents': 1}


def test_corrupt_parquet_files(demo_data, tmp_path):
  path = tmp_path / 'data.parquet'
  pq.write_table(pa.table({'text': [f'doc {i} ' * 20 for i in range(300)]}), path, row_group_size=100,
                 compression='NONE')
  content = bytearray(path.read_bytes())
  page = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
  content[page:page + 40] = b'\xff' * 40  # the page header of row group 1
  path.write_bytes(bytes(content))
  with pytest.raises(BadRecord, match=re.escape(f'{path}, row group 1: cannot be read (')):
    _read(demo_data, path)
  _, stats = _read(demo_data, path, skip_bad_records=True)
  assert stats == {'skipped_bad_records': 100}  # the rows of the row group, counted
  path.write_bytes(bytes(content[:len(content) // 2]))  # truncated: no footer
  with pytest.raises(BadRecord, match=re.escape(f'{path}: not a readable Parquet file (Parquet magic bytes')):
    _read(demo_data, path)
  with pytest.raises(ValueError, match=re.escape(f"{path} is a Parquet file but config.data.format is "
                                                 "'jsonl': set config.data.format=parquet")):
    _pretrain(demo_data, format='jsonl', eval_files=str(path)).eval_batches(0, 1, 2, 0)


def test_bad_sft_parquet_names_file_row_group_and_row(demo_data, chat_records, tmp_path):
  path = write_parquet(tmp_path / 'bad.parquet', [{'conversation': 'x'}], 1)
  with pytest.raises(BadRecord, match=re.escape(f"{path}: no column 'messages' "
                                                '(config.data.fields.messages)')):
    _sft(demo_data, path)
  rows = [{'instruction': 'Say hi', 'output': 'hi'}] * 3
  pq.write_table(pa.Table.from_pylist(rows[:2] + [{'instruction': 'Count', 'output': None}] + rows),
                 path, row_group_size=2)
  with pytest.raises(BadRecord, match=re.escape(f"{path}, row group 1, row 0: field 'output' must be a "
                                                'string, got NoneType')):
    _sft(demo_data, path, format='alpaca')
  data = _sft(demo_data, path, format='alpaca', skip_bad_records=True)
  assert len(data.train_examples) == 5 and data.stats() == {'train_skipped_bad_records': 1}

"""Where documents come from: local or gs:// files (plain text, JSONL or Parquet) and TFDS, sharded
per host.

Every record travels with its provenance (file and line or byte offset; Parquet: file, row group and
row) to the one cleaning path of data/records.py, so that a bad record is reported by name: invalid
UTF-8 (an error, or replaced and counted), a malformed JSONL line or missing field, a null Parquet
cell, a record over `max_record_bytes`. Empty and whitespace-only documents are skipped and counted.
Counts live in a `Counters` object that the trainer logs. Paths go through etils.epath (local, or
gs:// through TensorFlow's file systems).

Parquet files (what `datasets` writes and the Hugging Face hub serves) are read with pyarrow one row
group at a time, only the text column, never a whole file: 8 files are read at a time, and tf.data's
parallel interleave reads ahead (measured: 32 row groups in memory at once, 4 per open file). The
position in them is exact and restorable because the dataset is one of (file, its row groups), each
row group expanded by a tf.data function: a checkpoint holds which row group and how far into it
(not its rows), and a restore reads that row group again.
"""

from concurrent import futures
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf
from etils import epath

from data import records
from data.config import PRETRAIN_FORMATS
from data.files import open_parquet, one_line, resolve_files
from data.records import BadRecord, Counters

# What data/sources.py reads; 'synthetic' (the other pretraining format) makes batches itself.
FORMATS = tuple(f for f in PRETRAIN_FORMATS if f != 'synthetic')


def shard_files(files: list[str], shard_index: int, shard_count: int) -> tuple[list[str], bool]:
  """Host `shard_index` of `shard_count` reads every shard_count-th file when there are enough files
  for each host to get one; otherwise every host reads all files and keeps every shard_count-th
  document. Returns (files to read, whether documents still need sharding). Either way the hosts'
  documents are disjoint and together complete.
  """
  if len(files) >= shard_count:
    return files[shard_index::shard_count], False
  return files, True


def _check_format(paths: Sequence[str], fmt: str):
  parquet = [p for p in paths if p.endswith('.parquet')]
  if fmt != 'parquet' and parquet:
    raise ValueError(f'{parquet[0]} is a Parquet file but config.data.format is {fmt!r}: set '
                     'config.data.format=parquet')


def record_text(raw: bytes, where: str, offset: int, fmt: str, text_field: str = 'text',
                utf8: str = 'error', max_record_bytes: int = 0, counters: Counters | None = None) -> str:
  """One raw record (a line, a file, a Parquet cell) -> its document text. `where` names it
  ('file:line') in errors; `offset` is the record's byte offset in its file (-1 where unknown)."""
  text = records.decode(raw, where, offset, utf8=utf8, max_record_bytes=max_record_bytes,
                        counters=counters)
  if fmt != 'jsonl':
    return text
  record = records.parse_json(text, where)
  if not isinstance(record, dict) or text_field not in record:
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise BadRecord(f'{where}: JSON record has no {text_field!r} field (set config.data.text_field); '
                    f'keys: {keys}')
  if not isinstance(record[text_field], str):
    raise BadRecord(f'{where}: field {text_field!r} must be a string, got '
                    f'{type(record[text_field]).__name__}')
  return record[text_field]


def _where(fmt: str, source: str, line: int) -> str:
  """A record's name in messages: 'file:line' (1-based), 'file, row group G, row R' (0-based, R
  within the row group), or the file."""
  if fmt == 'parquet':
    return f'{source}, row {line}'
  return source + (f':{line + 1}' if line >= 0 else '')


def _cleaner(fmt, text_field, utf8, max_record_bytes, skip_bad_records, counters):
  """numpy_function: a batch of (source, line, offset, raw) records -> the documents worth keeping."""
  def clean(sources, lines, offsets, raws):
    kept = []
    for source, line, offset, raw in zip(sources, lines, offsets, raws):
      where = _where(fmt, source.decode(), int(line))
      try:
        text = record_text(raw, where, int(offset), fmt, text_field, utf8, max_record_bytes, counters)
      except BadRecord:
        if not skip_bad_records:
          raise
        counters.add('skipped_bad_records')
        continue
      if not text.strip():
        counters.add('skipped_empty_documents')
        continue
      kept.append(text.encode('utf-8'))
    return np.array(kept, dtype=object).reshape([len(kept)])
  return clean


def _numbered_records(fmt: str):
  """tf.data function: a file path -> its records as (source, line, byte offset, raw bytes)."""
  def read(path):
    if fmt == 'files':
      return tf.data.Dataset.from_tensors((path, tf.constant(-1, tf.int64), tf.constant(0, tf.int64),
                                           tf.io.read_file(path)))

    def number(state, line):
      index, offset = state
      return (index + 1, offset + tf.cast(tf.strings.length(line), tf.int64) + 1), (path, index, offset, line)
    # The offset assumes '\n' line ends (TextLineDataset strips them); it is only used in messages.
    return tf.data.TextLineDataset(path).scan((tf.constant(0, tf.int64), tf.constant(0, tf.int64)),
                                              number)
  return read


def _is_text(arrow_type) -> bool:
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  if pa.types.is_dictionary(arrow_type):
    arrow_type = arrow_type.value_type
  return any(test(arrow_type) for test in (pa.types.is_string, pa.types.is_large_string,
                                           pa.types.is_string_view, pa.types.is_binary,
                                           pa.types.is_large_binary, pa.types.is_binary_view))


def parquet_row_groups(path: str, column: str) -> int:
  """The number of row groups of a Parquet file whose `column` holds text (a BadRecord otherwise)."""
  with open_parquet(path) as parquet:
    schema = parquet.schema_arrow
    if column not in schema.names:
      raise BadRecord(f'{path}: no column {column!r} (set config.data.text_field); columns: '
                      f'{schema.names}')
    arrow_type = schema.field(column).type
    if not _is_text(arrow_type):
      raise BadRecord(f'{path}, row group 0, row 0: column {column!r} holds {arrow_type}, not strings '
                      '(set config.data.text_field to a string column)')
    return parquet.metadata.num_row_groups


def parquet_cells(path: str, group: int, column: str, skip_bad_records: bool = False,
                  counters: Counters | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(row numbers, raw bytes) of the `column` cells of one row group. A null cell, or a row group that
  cannot be decoded, is a BadRecord naming file, row group (and row); skipped and counted (as records)
  with `skip_bad_records`."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  counters = counters or Counters()
  with open_parquet(path) as parquet:
    try:
      cells = parquet.read_row_group(group, columns=[column]).column(0)
    except (pa.ArrowException, OSError) as e:
      if not skip_bad_records:
        raise BadRecord(f'{path}, row group {group}: cannot be read ({one_line(e)})') from None
      counters.add('skipped_bad_records', parquet.metadata.row_group(group).num_rows)
      return np.zeros([0], np.int64), np.zeros([0], object)
  rows = np.arange(len(cells), dtype=np.int64)
  if cells.null_count:
    null = cells.is_null().to_numpy(zero_copy_only=False)
    if not skip_bad_records:
      raise BadRecord(f'{path}, row group {group}, row {np.flatnonzero(null)[0]}: column {column!r} is '
                      'null')
    counters.add('skipped_bad_records', int(null.sum()))
    rows, cells = rows[~null], cells.filter(pa.array(~null))
  if pa.types.is_dictionary(cells.type):
    cells = cells.dictionary_decode()
  return rows, cells.cast(pa.large_binary()).to_numpy(zero_copy_only=False)


def _parquet_shards(paths, column, shard_index, shard_count, shard_docs):
  """(paths, row groups of each to read, whether documents still need sharding). With fewer files
  than hosts, hosts share out the row groups when there are enough of them."""
  with futures.ThreadPoolExecutor(16) as pool:  # each footer is a round trip on an object store
    counts = list(pool.map(lambda path: parquet_row_groups(path, column), paths))
  groups = [list(range(n)) for n in counts]
  if shard_docs and sum(counts) >= shard_count:
    units = [(i, g) for i, n in enumerate(counts) for g in range(n)][shard_index::shard_count]
    groups = [[g for j, g in units if j == i] for i in range(len(paths))]
    shard_docs = False
  kept = [i for i, g in enumerate(groups) if g]
  if not kept:
    raise ValueError(f'no rows to read in {", ".join(paths[:5])}{" ..." if len(paths) > 5 else ""}')
  return [paths[i] for i in kept], [groups[i] for i in kept], shard_docs


def _parquet_records(column, skip_bad_records, counters):
  """tf.data function: (file path, its row groups) -> its records as (source, row, -1, raw bytes)."""
  def read(path, group):
    return parquet_cells(path.decode(), int(group), column, skip_bad_records, counters)

  def records(path, groups):
    def group_records(group):
      rows, raws = tf.numpy_function(read, [path, group], (tf.int64, tf.string), stateful=False)
      source = tf.strings.join([path, ', row group ', tf.strings.as_string(group)])
      no_offset = tf.constant(-1, tf.int64)
      return tf.data.Dataset.from_tensor_slices((tf.reshape(rows, [-1]), tf.reshape(raws, [-1]))).map(
          lambda row, raw: (source, row, no_offset, raw))
    return tf.data.Dataset.from_tensor_slices(groups).flat_map(group_records)
  return records


def documents(fmt: str, files: str, *, text_field: str = 'text', shard_index: int = 0,
              shard_count: int = 1, seed: int | None = None, repeat: bool = False,
              tfds_name: str = '', tfds_split: str = 'train', tfds_data_dir: str | None = None,
              utf8: str = 'error', max_record_bytes: int = 0, skip_bad_records: bool = False,
              counters: Counters | None = None) -> tf.data.Dataset:
  """A deterministic dataset of document strings for one host. With `seed`, file order is shuffled
  (anew each epoch); with `repeat`, it never ends."""
  if fmt not in FORMATS:
    raise ValueError(f'config.data.format must be one of {FORMATS}, got {fmt!r}')
  records.check_policy(utf8)
  counters = counters or Counters()
  if fmt == 'tfds':
    rows = _tfds_records(tfds_name, tfds_split, tfds_data_dir, text_field, shard_index, shard_count,
                         seed)
    if repeat:
      rows = rows.repeat()
  else:
    paths, shard_docs = shard_files(resolve_files(files), shard_index, shard_count)
    _check_format(paths, fmt)
    if fmt == 'parquet':
      paths, groups, shard_docs = _parquet_shards(paths, text_field, shard_index, shard_count,
                                                  shard_docs)
      file_ds = tf.data.Dataset.from_tensor_slices((paths, tf.ragged.constant(groups, tf.int64)))
      read = _parquet_records(text_field, skip_bad_records, counters)
    else:
      file_ds = tf.data.Dataset.from_tensor_slices(paths)
      read = _numbered_records(fmt)
    if seed is not None:
      file_ds = file_ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    if repeat:
      file_ds = file_ds.repeat()
    rows = file_ds.interleave(read, cycle_length=min(len(paths), 8), block_length=16,
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if shard_docs:
      rows = rows.shard(shard_count, shard_index)
  clean = _cleaner('files' if fmt == 'tfds' else fmt, text_field, utf8, max_record_bytes,
                   skip_bad_records, counters)

  def clean_batch(source, line, offset, raw):
    docs = tf.numpy_function(clean, [source, line, offset, raw], tf.string, stateful=False)
    docs.set_shape([None])
    return docs
  return rows.batch(256).map(clean_batch).unbatch()


def _tfds_records(name, split, data_dir, text_field, shard_index, shard_count, seed):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  if not name:
    raise ValueError('config.data.format is "tfds" but config.data.tfds_name is empty')
  builder = tfds.builder(name, data_dir=data_dir or None)
  features = builder.info.features
  if text_field not in features:
    raise ValueError(f'TFDS dataset {name!r} has no feature {text_field!r} '
                     f'(set config.data.text_field); features: {sorted(features.keys())}')
  host_split = tfds.even_splits(split, n=shard_count, drop_remainder=False)[shard_index]
  read_config = tfds.ReadConfig(shuffle_seed=seed, interleave_cycle_length=4)
  ds = builder.as_dataset(split=host_split, shuffle_files=seed is not None, read_config=read_config)
  source = tf.constant(f'tfds:{name}/{host_split}')
  return ds.enumerate().map(lambda i, ex: (source, i, tf.constant(-1, tf.int64), ex[text_field]))


PYTHON_FORMATS = ('lines', 'files', 'jsonl', 'parquet')


def _python_records(path: str, fmt: str, text_field: str) -> Iterator[tuple[str, bytes, int]]:
  """(where, raw record, byte offset) for each record of one file."""
  if fmt == 'parquet':
    for group in range(parquet_row_groups(path, text_field)):
      rows, raws = parquet_cells(path, group, text_field)
      yield from ((_where(fmt, f'{path}, row group {group}', row), raw, -1)
                  for row, raw in zip(rows, raws))
    return
  with epath.Path(path).open('rb') as f:
    yield from [(path, f.read(), 0)] if fmt == 'files' else records.lines(f, path)


def iter_texts_python(files: Sequence[str], fmt: str, text_field: str = 'text',
                      max_chars: int | None = None) -> Iterator[str]:
  """Plain-Python document reader (for tokenizer training), same formats and checks as `documents`."""
  if fmt not in PYTHON_FORMATS:
    raise ValueError(f'format must be one of {PYTHON_FORMATS}, got {fmt!r}')
  _check_format(files, fmt)
  total = 0
  for path in files:
    for where, raw, offset in _python_records(path, fmt, text_field):
      text = record_text(raw, where, offset, fmt, text_field)
      if not text.strip():
        continue
      yield text
      total += len(text)
      if max_chars and total >= max_chars:
        return

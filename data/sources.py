"""Where documents come from: local or gs:// files (plain text or JSONL) and TFDS, sharded per host.

Every record travels with its provenance (file, line, byte offset) to the one cleaning path of
data/records.py, so that a bad record is reported by name: invalid UTF-8 (an error, or replaced and
counted), a malformed JSONL line or missing field, a record over `max_record_bytes`. Empty and
whitespace-only documents are skipped and counted. Counts live in a `Counters` object that the
trainer logs. Paths go through etils.epath (local, or gs:// through TensorFlow's file systems).
"""

import glob as local_glob
import os
import re
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf
from etils import epath

from data import records
from data.config import PRETRAIN_FORMATS
from data.records import BadRecord, Counters

# What data/sources.py reads; 'synthetic' (the other pretraining format) makes batches itself.
FORMATS = tuple(f for f in PRETRAIN_FORMATS if f != 'synthetic')


def glob(pattern: str) -> list[str]:
  """Files matching `pattern` (`*`, `?`, `[...]`, and `**` locally), local or on an object store."""
  if '://' not in pattern:
    return sorted(local_glob.glob(pattern, recursive=True))
  parts = pattern.split('/')
  fixed = next((i for i, part in enumerate(parts) if re.search(r'[*?[]', part)), len(parts))
  root = epath.Path('/'.join(parts[:fixed]))
  if fixed == len(parts):
    return [pattern] if root.exists() else []
  return sorted(str(p) for p in root.glob('/'.join(parts[fixed:])))


def resolve_files(patterns: str | Sequence[str]) -> list[str]:
  """Expands comma-separated paths/globs (local or gs://); every pattern must match something."""
  if isinstance(patterns, str):
    patterns = [p.strip() for p in patterns.split(',') if p.strip()]
  if not patterns:
    raise ValueError('No input files given (empty file pattern)')
  files = []
  for pattern in patterns:
    matched = glob(pattern)
    if not matched:
      raise FileNotFoundError(f'File pattern {pattern!r} matched no file')
    files.extend(matched)
  files = sorted(set(files))
  empty = [f for f in files if epath.Path(f).stat().length == 0]
  if empty:
    raise ValueError(f'{len(empty)} empty input file(s): {", ".join(empty[:5])}'
                     f'{" ..." if len(empty) > 5 else ""}; remove them or fix the pattern')
  return files


def shard_files(files: list[str], shard_index: int, shard_count: int) -> tuple[list[str], bool]:
  """Host `shard_index` of `shard_count` reads every shard_count-th file when there are enough files
  for each host to get one; otherwise every host reads all files and keeps every shard_count-th
  document. Returns (files to read, whether documents still need sharding). Either way the hosts'
  documents are disjoint and together complete.
  """
  if len(files) >= shard_count:
    return files[shard_index::shard_count], False
  return files, True


def record_text(raw: bytes, where: str, offset: int, fmt: str, text_field: str = 'text',
                utf8: str = 'error', max_record_bytes: int = 0, counters: Counters | None = None) -> str:
  """One raw record -> its document text. `where` names it ('file:line') in errors; `offset` is the
  record's byte offset in its file (-1 where unknown)."""
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


def _cleaner(fmt, text_field, utf8, max_record_bytes, skip_bad_records, counters):
  """numpy_function: a batch of (source, line, offset, raw) records -> the documents worth keeping."""
  def clean(sources, lines, offsets, raws):
    kept = []
    for source, line, offset, raw in zip(sources, lines, offsets, raws):
      where = source.decode('utf-8', 'backslashreplace') + (f':{line + 1}' if line >= 0 else '')
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
    # As bytes: a local file name need not be UTF-8, which a TensorFlow string of text must be.
    file_ds = tf.data.Dataset.from_tensor_slices([os.fsencode(p) for p in paths])
    if seed is not None:
      file_ds = file_ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    if repeat:
      file_ds = file_ds.repeat()
    rows = file_ds.interleave(_numbered_records(fmt), cycle_length=min(len(paths), 8),
                              block_length=16, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
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


def iter_texts_python(files: Sequence[str], fmt: str, text_field: str = 'text',
                      max_chars: int | None = None) -> Iterator[str]:
  """Plain-Python document reader (for tokenizer training), same formats and checks as `documents`."""
  if fmt not in ('lines', 'files', 'jsonl'):
    raise ValueError(f'format must be lines, files or jsonl, got {fmt!r}')
  total = 0
  for path in files:
    with epath.Path(path).open('rb') as f:
      for where, raw, offset in ([(path, f.read(), 0)] if fmt == 'files' else records.lines(f, path)):
        text = record_text(raw, where, offset, fmt, text_field)
        if not text.strip():
          continue
        yield text
        total += len(text)
        if max_chars and total >= max_chars:
          return

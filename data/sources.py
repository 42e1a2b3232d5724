"""Where documents come from: local or gs:// files (plain text or JSONL) and TFDS, sharded per host."""

import json
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf

FORMATS = ('lines', 'files', 'jsonl', 'tfds')


def resolve_files(patterns: str | Sequence[str]) -> list[str]:
  """Expands comma-separated paths/globs (local or gs://); every pattern must match something."""
  if isinstance(patterns, str):
    patterns = [p.strip() for p in patterns.split(',') if p.strip()]
  if not patterns:
    raise ValueError('No input files given (empty file pattern)')
  files = []
  for pattern in patterns:
    matched = sorted(tf.io.gfile.glob(pattern))
    if not matched:
      raise FileNotFoundError(f'File pattern {pattern!r} matched no file')
    files.extend(matched)
  return sorted(set(files))


def shard_files(files: list[str], shard_index: int, shard_count: int) -> tuple[list[str], bool]:
  """Host `shard_index` of `shard_count` reads every shard_count-th file when there are enough files
  for each host to get one; otherwise every host reads all files and keeps every shard_count-th
  document. Returns (files to read, whether documents still need sharding). Either way the hosts'
  documents are disjoint and together complete.
  """
  if len(files) >= shard_count:
    return files[shard_index::shard_count], False
  return files, True


def _json_text(path: bytes, line_no: int, line: bytes, text_field: str) -> bytes:
  where = f'{path.decode()}:{line_no + 1}'
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f'{where}: malformed JSON ({e.msg} at column {e.colno})') from None
  if not isinstance(record, dict) or text_field not in record:
    raise ValueError(f'{where}: JSON record has no {text_field!r} field '
                     f'(set config.data.text_field); keys: {sorted(record) if isinstance(record, dict) else type(record).__name__}')
  text = record[text_field]
  if not isinstance(text, str):
    raise ValueError(f'{where}: field {text_field!r} must be a string, got {type(text).__name__}')
  return text.encode('utf-8')


def _parse_jsonl_batch(text_field: str):
  def parse(paths, line_nos, lines):
    return np.array([_json_text(p, int(n), l, text_field) for p, n, l in zip(paths, line_nos, lines)],
                    dtype=object)
  return parse


def _read_file(fmt: str, text_field: str):
  """tf.data function: one file path -> dataset of documents (tf.string)."""
  def read(path):
    if fmt == 'files':
      return tf.data.Dataset.from_tensors(tf.io.read_file(path))
    lines = tf.data.TextLineDataset(path)
    if fmt == 'lines':
      return lines
    numbered = lines.enumerate().map(lambda i, line: (path, i, line))
    return numbered.batch(256).map(
        lambda p, i, l: tf.numpy_function(_parse_jsonl_batch(text_field), [p, i, l], tf.string,
                                          stateful=False)).unbatch()
  return read


def documents(fmt: str, files: str, *, text_field: str = 'text', shard_index: int = 0,
              shard_count: int = 1, seed: int | None = None, repeat: bool = False,
              tfds_name: str = '', tfds_split: str = 'train', tfds_data_dir: str | None = None
              ) -> tf.data.Dataset:
  """A deterministic dataset of document strings for one host. With `seed`, file order is shuffled
  (anew each epoch); with `repeat`, it never ends. Empty and whitespace-only documents are dropped.
  """
  if fmt not in FORMATS:
    raise ValueError(f'config.data.format must be one of {FORMATS}, got {fmt!r}')
  if fmt == 'tfds':
    docs = _tfds_documents(tfds_name, tfds_split, tfds_data_dir, text_field, shard_index, shard_count,
                           seed)
    if repeat:
      docs = docs.repeat()
  else:
    paths, shard_docs = shard_files(resolve_files(files), shard_index, shard_count)
    file_ds = tf.data.Dataset.from_tensor_slices(paths)
    if seed is not None:
      file_ds = file_ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    if repeat:
      file_ds = file_ds.repeat()
    docs = file_ds.interleave(_read_file(fmt, text_field), cycle_length=min(len(paths), 8),
                              block_length=16, num_parallel_calls=tf.data.AUTOTUNE,
                              deterministic=True)
    if shard_docs:
      docs = docs.shard(shard_count, shard_index)
  return docs.filter(lambda d: tf.strings.length(tf.strings.strip(d)) > 0)


def _tfds_documents(name, split, data_dir, text_field, shard_index, shard_count, seed):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  if not name:
    raise ValueError('config.data.format is "tfds" but config.data.tfds_name is empty')
  builder = tfds.builder(name, data_dir=data_dir or None)
  host_split = tfds.even_splits(split, n=shard_count, drop_remainder=False)[shard_index]
  read_config = tfds.ReadConfig(shuffle_seed=seed, interleave_cycle_length=4)
  ds = builder.as_dataset(split=host_split, shuffle_files=seed is not None, read_config=read_config)
  features = builder.info.features
  if text_field not in features:
    raise ValueError(f'TFDS dataset {name!r} has no feature {text_field!r} '
                     f'(set config.data.text_field); features: {sorted(features.keys())}')
  return ds.map(lambda ex: ex[text_field])


def iter_texts_python(files: Sequence[str], fmt: str, text_field: str = 'text',
                      max_chars: int | None = None) -> Iterator[str]:
  """Plain-Python document reader (for tokenizer training), same formats as `documents`."""
  if fmt not in ('lines', 'files', 'jsonl'):
    raise ValueError(f'format must be lines, files or jsonl, got {fmt!r}')
  total = 0
  for path in files:
    with tf.io.gfile.GFile(path, 'rb') as f:
      if fmt == 'files':
        texts = [f.read().decode('utf-8')]
      else:
        texts = (line.decode('utf-8') if fmt == 'lines'
                 else _json_text(path.encode(), n, line, text_field).decode('utf-8')
                 for n, line in enumerate(f))
      for text in texts:
        if not text.strip():
          continue
        yield text
        total += len(text)
        if max_chars and total >= max_chars:
          return

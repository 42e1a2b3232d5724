"""Weighted mixtures of sources (`config.data.mixture`), for pretraining and instruction tuning alike.

The config: `data.mixture` is a ConfigDict of named sources, each made by `data.config.source(weight,
**keys)` in a config file; a source sets its own files and whichever data keys differ for it (format,
text_field, fields, ...), and takes the others from `data`:

  c.data.mixture.web = data_config.source(0.7, format='parquet', train_files='fineweb/*.parquet')
  c.data.mixture.code = data_config.source(0.3, train_files='code/*.jsonl', text_field='content')

A ConfigDict of named sources rather than a string spec or a list: each source's keys keep their types
and their checks, every one of them can be changed from the command line
(`--config.data.mixture.code.weight=0.5`; a flag can change a key but not add one, so sources are
declared in the config file), globs keep their commas, and the names label the per-source counts in
the logs. A string spec would need its own parser and escaping, and its parts no types; a list field
is overridden from the command line as a whole, if at all, and its entries have no names.

Mixing: each source is read, tokenized and packed into rows by itself, sharded over hosts as a single
source is, with its own shuffle seed; rows are then drawn from the sources at random with the weights
(`tf.data.Dataset.sample_from_datasets`, seeded by `data.seed` and the host's index, so hosts draw
independently and each draws its share). A weight is therefore a source's share of rows, i.e. of
tokens: pretraining rows are full, instruction-tuning rows nearly so. A row holds one source only. The
draw, every source's files, shuffle buffer and packing carry are all state of the one tf.data iterator,
saved in every checkpoint and restored exactly. Each batch also carries a running count of the real
tokens taken from each source (a `scan`, so it is saved and restored too); the trainer logs this
host's counts, as it does the other data counters, as `data/tokens/<name>`.
"""

import dataclasses
import zlib
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from data import packing
from data.config import PREFERENCE_FORMATS, PRETRAIN_FORMATS, SFT_FORMATS, SOURCE_KEYS
from data.iterator import DatasetIterator

# Keys a source never takes from `data`: which data is read.
_OWN_KEYS = ('train_files', 'eval_files', 'tfds_name')


@dataclasses.dataclass(frozen=True)
class Source:
  name: str         # '' for the single source of a config without a mixture
  weight: float     # normalised: the weights of a mixture sum to 1
  config: Any       # the data config this source is read with
  seed: int         # its shuffle seed


def sources(data: Any) -> list[Source]:
  """The sources of a data config: its mixture, sorted by name, or the config itself."""
  if not data.mixture:
    return [Source('', 1.0, data, data.seed)]
  for key in ('train_files', 'eval_files'):
    if data[key]:
      raise ValueError(f'config.data.{key} must be empty when config.data.mixture is set: each source '
                       f'names its own (config.data.mixture.<name>.{key})')
  family = next((f for f in (SFT_FORMATS, PREFERENCE_FORMATS) if data.format in f), PRETRAIN_FORMATS)
  found = []
  for name in sorted(data.mixture):
    spec, where = data.mixture[name], f'config.data.mixture.{name}'
    if not hasattr(spec, 'keys') or 'weight' not in spec:
      raise ValueError(f'{where} must be a source: data.config.source(weight, train_files=..., ...)')
    unknown = sorted(set(spec.keys()) - {'weight', *SOURCE_KEYS})
    if unknown:
      raise ValueError(f'{where} has unknown keys {unknown}; a source may set {SOURCE_KEYS}')
    if not np.isfinite(spec.weight) or spec.weight <= 0:
      raise ValueError(f'{where}.weight must be a positive number, got {spec.weight}')
    config = data.copy_and_resolve_references()
    config.mixture = type(data.mixture)()
    for key in _OWN_KEYS:
      config[key] = ''
    for key, value in spec.items():
      if key == 'fields':
        config.fields.update({k: v for k, v in value.items() if v is not None})
      elif key != 'weight' and value is not None:
        config[key] = value
    if config.format not in family or config.format == 'synthetic':
      raise ValueError(f'{where}.format is {config.format!r}, but config.data.format '
                       f'{data.format!r} makes this a mixture of {tuple(f for f in family if f != "synthetic")}')
    if not (config.tfds_name if config.format == 'tfds' else config.train_files):
      raise ValueError(f'{where}.{"tfds_name" if config.format == "tfds" else "train_files"} is empty')
    found.append((name, spec.weight, config))
  total = sum(weight for _, weight, _ in found)
  return [Source(name, weight / total, config, (data.seed + zlib.crc32(name.encode())) % 2 ** 31)
          for name, weight, config in found]


def host_seed(seed: int, shard_index: int) -> int:
  """The draw's seed for one host: hosts draw independently, each deterministically."""
  return int(np.random.SeedSequence([seed, shard_index]).generate_state(1)[0]) % 2 ** 31


def batches(rows: Sequence[tuple[int, tf.data.Dataset]], weights: Sequence[float] | None,
            seed: int, shard_index: int, batch_size: int, pad_id: int,
            mixed: bool) -> tf.data.Dataset:
  """(source index, rows) of each source -> batches of the train step's features.

  With `weights` (training) rows are drawn at random, else the sources follow one another (one
  evaluation pass). In a mixture (`mixed`), batches also hold each row's `source` index and, when
  drawing, the running per-source count of real tokens (`source_tokens`); `Iterator` takes them out.
  """
  if mixed:
    rows = [(i, r.map(lambda row, i=i: {**row, 'source': tf.constant(i, tf.int32)})) for i, r in rows]
  datasets = [r for _, r in rows]
  if weights is not None and len(datasets) > 1:
    joined = tf.data.Dataset.sample_from_datasets(
        datasets, weights=[weights[i] for i, _ in rows], seed=host_seed(seed, shard_index))
  else:
    joined = datasets[0]
    for more in datasets[1:]:
      joined = joined.concatenate(more)
  out = joined.batch(batch_size, drop_remainder=weights is not None).map(
      lambda r: packing.row_features(r, pad_id), num_parallel_calls=tf.data.AUTOTUNE)
  if mixed and weights is not None:
    out = _count_tokens(out, len(weights))
  return out.prefetch(tf.data.AUTOTUNE)


def _count_tokens(batches_: tf.data.Dataset, n_sources: int) -> tf.data.Dataset:
  def count(seen, batch):
    real = tf.reduce_sum(tf.cast(batch['segment_ids'] > 0, tf.int64), axis=1)
    seen += tf.math.unsorted_segment_sum(real, batch['source'], n_sources)
    return seen, {**batch, 'source_tokens': seen}
  return batches_.scan(tf.zeros([n_sources], tf.int64), count)


class Iterator(DatasetIterator):
  """A DatasetIterator that hands out the train step's batch only, keeping the running per-source
  token counts of a mixture (those of the last batch handed out, i.e. of what the trainer consumed)."""

  def __init__(self, dataset: tf.data.Dataset, names: Sequence[str] = ()):
    super().__init__(dataset)
    self.names = list(names)
    self.tokens = np.zeros(len(self.names), np.int64)

  def __next__(self):
    batch = super().__next__()
    batch.pop('source', None)
    if 'source_tokens' in batch:
      self.tokens = batch.pop('source_tokens')
    return batch

  def tokens_seen(self) -> dict[str, int]:
    """{'tokens/<source>': real tokens handed out so far, restored with the iterator's state}."""
    return {f'tokens/{name}': int(n) for name, n in zip(self.names, self.tokens)}

"""The instruction-tuning input pipeline: records -> chat template -> (tokens, loss mask) -> rows.

Formats: alpaca, chat and prompt/completion records in JSON, JSONL or Parquet files, local or gs://
(data/instructions.py reads them). Every record is checked and rendered once, up front (instruction sets fit in host memory); problems
name the file and line (Parquet: file, row group and row). With `skip_bad_records`, bad records are
skipped and counted instead. Several instruction sets with weights: data/mixture.py.
"""

import hashlib
from typing import Any, Callable, Iterator

import numpy as np
import tensorflow as tf
from absl import logging

from data import chat, mixture, packing, records
from data.batch import pad_batch
from data.config import OVERLONG_POLICIES, SFT_FORMATS
from data.files import resolve_files
from data.instructions import read_records, role_map, to_messages
from data.records import BadRecord
from data.tokenizer import load_tokenizer


class SFTData:
  """A DataSource (see train/loop.py) of instruction-tuning batches, built from `config.data`."""

  def __init__(self, data_config: Any, seq_len: int):
    self.config = data_config
    self.seq_len = seq_len
    self.tokenizer = load_tokenizer(data_config.tokenizer)
    self.template = chat.from_config(data_config, self.tokenizer)
    self.counts = records.Counters()
    self.sources = mixture.sources(data_config)
    self._train_iterator = None
    self.train_sets, self.eval_sets = [], []  # per source: examples (ids, mask)
    # The held-out records as (where, messages), for evaluations that generate (train/evaluation.py).
    self.eval_conversations = []
    for source in self.sources:
      cfg = source.config
      if cfg.format not in SFT_FORMATS:
        raise ValueError(f'config.data.format must be one of {SFT_FORMATS} for instruction tuning, got '
                         f'{cfg.format!r}; it names the records\' fields, and files named *.parquet are '
                         'read as Parquet whatever the format')
      if cfg.overlong not in OVERLONG_POLICIES:
        raise ValueError(f'config.data.overlong must be one of {OVERLONG_POLICIES}, got '
                         f'{cfg.overlong!r}')
      empty_before = self.counts.snapshot().get('train_empty_mask', 0)
      train, held_out, conversations = self._load(cfg, cfg.train_files, 'train')
      if cfg.eval_files:
        held_out, _, conversations = self._load(cfg, cfg.eval_files, 'eval')
      self.eval_conversations += conversations
      self.train_sets.append(train)
      self.eval_sets.append(held_out)
      if source.name:
        logging.info('SFT data, source %s: %d train and %d eval examples', source.name, len(train),
                     len(held_out))
      if not train:
        empty = self.counts.snapshot().get('train_empty_mask', 0) - empty_before
        raise BadRecord(f'no usable training examples in {cfg.train_files}' + (
            f': the loss masks of all {empty} are empty (chat template {self.template.name}; does any '
            'message have the role "assistant"? Other role names are renamed by config.data.roles, '
            'e.g. "gpt=assistant")' if empty else ''))
    self.train_examples = [e for examples in self.train_sets for e in examples]
    self.eval_examples = [e for examples in self.eval_sets for e in examples]
    logging.info('SFT data: %d train and %d eval examples; %s', len(self.train_examples),
                 len(self.eval_examples),
                 ', '.join(f'{k} {v}' for k, v in sorted(self.stats().items())) or 'nothing skipped')

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  def stats(self) -> dict[str, int]:
    """Records skipped, truncated or repaired while loading; for a mixture, the real tokens each
    source has given the train iterator (since the run started)."""
    tokens = self._train_iterator.tokens_seen() if self._train_iterator else {}
    return {**self.counts.snapshot(), **tokens}

  def _load(self, cfg: Any, patterns: str, split: str):
    """(examples, held-out examples, held-out records as (where, messages)) of one source; for 'eval'
    every record is held out, for 'train' the share `eval_fraction` (without eval_files)."""
    examples, held_out, conversations = [], [], []
    roles = role_map(cfg)

    def render(record):
      messages = to_messages(record, cfg.format, cfg.fields, roles)
      return messages, self.template.examples(messages)

    for where, (messages, rendered) in parsed_records(patterns, cfg, self.counts, split, render):
      is_held_out = split == 'eval' or (not cfg.eval_files
                                        and in_held_out_share(where, cfg.eval_fraction))
      if is_held_out:
        conversations.append((where, messages))
      for rendered_example in rendered:
        if not any(rendered_example.mask):  # nothing to learn: no assistant message
          self.counts.add(f'{split}_empty_mask')
          continue
        example = self._fit(rendered_example.ids, rendered_example.mask, split, cfg.overlong)
        if example is None:
          continue
        (held_out if split == 'train' and is_held_out else examples).append(example)
    return examples, held_out, conversations

  def _fit(self, ids, mask, split, overlong):
    if len(ids) <= self.seq_len:
      return np.asarray(ids, np.int32), np.asarray(mask, np.int32)
    if overlong == 'drop':
      self.counts.add(f'{split}_dropped_overlong')
      return None
    ids, mask = ids[:self.seq_len], mask[:self.seq_len]
    if not any(mask[1:]):  # nothing left to learn from
      self.counts.add(f'{split}_dropped_overlong_no_answer')
      return None
    self.counts.add(f'{split}_truncated')
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)

  def _rows(self, examples, source: mixture.Source, shard_index, shard_count, train: bool
            ) -> tf.data.Dataset:
    """One source's rows of examples: for training shuffled and endless, else one ordered pass."""
    examples = examples[shard_index::shard_count]
    if not examples:
      raise BadRecord(f'host {shard_index} of {shard_count} has no examples'
                      + f' of source {source.name!r}' * bool(source.name))
    lengths = np.array([len(e[0]) for e in examples], np.int64)
    ragged = lambda i: tf.RaggedTensor.from_row_lengths(np.concatenate([e[i] for e in examples]), lengths)
    ds = tf.data.Dataset.from_tensor_slices({'tokens': ragged(0), 'trainable': ragged(1)})
    if train:
      ds = ds.shuffle(len(examples), seed=source.seed, reshuffle_each_iteration=True).repeat()
    rows = packing.example_rows(ds)
    if self.config.packing:
      return packing.pack_examples(rows, self.seq_len, flush=not train)
    return packing.pad_rows(rows, self.seq_len)

  def dataset(self, split: str, shard_index: int, shard_count: int, batch_size: int) -> tf.data.Dataset:
    """Batches of rows. 'train' is shuffled and endless; 'eval' is one ordered pass."""
    train = split == 'train'
    sets = self.train_sets if train else self.eval_sets
    rows = [(i, self._rows(examples, source, shard_index, shard_count, train))
            for i, (source, examples) in enumerate(zip(self.sources, sets)) if examples]
    return mixture.batches(rows, [s.weight for s in self.sources] if train else None, self.config.seed,
                           shard_index, batch_size, self.tokenizer.pad_id, bool(self.config.mixture))

  def has_eval(self) -> bool:
    return bool(self.eval_examples)

  def train_iterator(self, shard_index, shard_count, batch_size):
    self._train_iterator = mixture.Iterator(self.dataset('train', shard_index, shard_count, batch_size),
                                            [s.name for s in self.sources if s.name])
    return self._train_iterator

  def eval_batches(self, shard_index, shard_count, batch_size, max_batches):
    if not self.has_eval():
      return []
    ds = self.dataset('eval', shard_index, shard_count, batch_size)
    if max_batches:
      ds = ds.take(max_batches)
    return [pad_batch(b, batch_size) for b in mixture.Iterator(ds)]


def parsed_records(patterns: str, cfg: Any, counts: records.Counters, split: str,
                   parse: Callable[[Any], Any]) -> Iterator[tuple[str, Any]]:
  """(location, parse(record)) for each record of the files `patterns` names. A bad record (unreadable,
  or one `parse` rejects with BadRecord or ChatFormatError) raises, naming its file and line, or with
  `cfg.skip_bad_records` is skipped and counted."""
  for path in resolve_files(patterns):
    for where, record in read_records(path, cfg, counts):
      error = record if isinstance(record, BadRecord) else None  # already names its place
      if error is None:
        try:
          parsed = parse(record)
        except (BadRecord, chat.ChatFormatError) as e:
          error = BadRecord(f'{where}: {e}')
      if error is not None:
        if not cfg.skip_bad_records:
          raise error
        counts.add(f'{split}_skipped_bad_records')
        logging.warning('Skipping %s', error)
        continue
      yield where, parsed


def in_held_out_share(where: str, fraction: float) -> bool:
  """A fixed pseudo-random share of records, by file name and line (not by folder)."""
  key = where.rsplit('/', 1)[-1].encode()
  return fraction > 0 and int(hashlib.sha256(key).hexdigest(), 16) % 10_000 < fraction * 10_000

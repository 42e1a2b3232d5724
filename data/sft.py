"""The instruction-tuning input pipeline: records -> chat template -> (tokens, loss mask) -> rows.

Formats (local or gs://), with configurable field names:
  alpaca  {"instruction", "input" (optional), "output"}, as JSONL or one JSON array
  chat    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]} per line
  prompt_completion  {"prompt", "completion"} per line
Every record is checked and rendered once, up front (instruction sets fit in host memory); problems
name the file and line. With `skip_bad_records`, bad records are skipped and counted instead.
"""

import hashlib
from typing import Any, Iterator

import numpy as np
import tensorflow as tf
from absl import logging
from etils import epath

from data import chat, packing, records, sources
from data.batch import pad_batch
from data.config import OVERLONG_POLICIES, SFT_FORMATS
from data.iterator import DatasetIterator
from data.records import BadRecord
from data.tokenizer import load_tokenizer


def _records(path: str, utf8: str, max_record_bytes: int, counters: records.Counters
             ) -> Iterator[tuple[str, Any]]:
  """(location, parsed JSON or the BadRecord it is) for each record of a .json array or JSONL file."""
  with epath.Path(path).open('rb') as f:
    if path.endswith('.json') and f.read(4096).lstrip().startswith(b'['):
      f.seek(0)
      try:
        items = records.parse_json(records.decode(f.read(), path, 0, utf8=utf8, counters=counters), path)
      except records.BadRecord as e:
        yield path, e
        return
      for i, item in enumerate(items):
        yield f'{path}[record {i}]', item
      return
    f.seek(0)
    for where, raw, offset in records.lines(f, path):
      try:
        text = records.decode(raw, where, offset, utf8=utf8, max_record_bytes=max_record_bytes,
                              counters=counters)
        if text.strip():
          yield where, records.parse_json(text, where)
      except records.BadRecord as e:
        yield where, e


def to_messages(record: Any, fmt: str, fields: Any) -> list[dict[str, str]]:
  """One record of format `fmt` -> a conversation (list of {role, content})."""
  if not isinstance(record, dict):
    raise BadRecord(f'expected a JSON object, got {type(record).__name__}')

  def field(name, required=True):
    key = fields[name]
    if key not in record:
      if required:
        raise BadRecord(f'missing field {key!r} (config.data.fields.{name}); '
                           f'record has {sorted(record)}')
      return ''
    if not isinstance(record[key], (str, list)):
      raise BadRecord(f'field {key!r} must be a string, got {type(record[key]).__name__}')
    return record[key]

  if fmt == 'alpaca':
    instruction, extra = field('instruction'), field('input', required=False)
    user = f'{instruction}\n\n{extra}' if isinstance(extra, str) and extra.strip() else instruction
    return [{'role': 'user', 'content': user}, {'role': 'assistant', 'content': field('output')}]
  if fmt == 'prompt_completion':
    return [{'role': 'user', 'content': field('prompt')},
            {'role': 'assistant', 'content': field('completion')}]
  if fmt == 'chat':
    messages = field('messages')
    if not isinstance(messages, list):
      raise BadRecord(f'field {fields["messages"]!r} must be a list of messages')
    out = []
    for i, m in enumerate(messages):
      if not isinstance(m, dict) or fields['role'] not in m or fields['content'] not in m:
        raise BadRecord(f'message {i} must be an object with {fields["role"]!r} and '
                           f'{fields["content"]!r}')
      out.append({'role': m[fields['role']], 'content': m[fields['content']]})
    return out
  raise ValueError(f'config.data.format must be one of {SFT_FORMATS}, got {fmt!r}')


class SFTData:
  """A DataSource (see train/loop.py) of instruction-tuning batches, built from `config.data`."""

  def __init__(self, data_config: Any, seq_len: int):
    self.config = data_config
    self.seq_len = seq_len
    self.tokenizer = load_tokenizer(data_config.tokenizer)
    self.template = chat.get_template(data_config.chat_template)
    if data_config.overlong not in OVERLONG_POLICIES:
      raise ValueError(f'config.data.overlong must be one of {OVERLONG_POLICIES}, got '
                       f'{data_config.overlong!r}')
    self.counts = records.Counters()
    train, held_out = self._load(data_config.train_files, 'train')
    if data_config.eval_files:
      held_out = self._load(data_config.eval_files, 'eval')[0]
    self.train_examples, self.eval_examples = train, held_out
    logging.info('SFT data: %d train and %d eval examples; %s', len(train), len(held_out),
                 ', '.join(f'{k} {v}' for k, v in sorted(self.stats().items())) or 'nothing skipped')
    if not train:
      raise BadRecord(f'no usable training examples in {data_config.train_files}')

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  def stats(self) -> dict[str, int]:
    """Records skipped, truncated or repaired while loading."""
    return self.counts.snapshot()

  def _load(self, patterns: str, split: str):
    """(examples, held-out examples); the split by `eval_fraction` only applies without eval_files."""
    cfg = self.config
    examples, held_out = [], []
    for path in sources.resolve_files(patterns):
      for where, record in _records(path, cfg.invalid_utf8, cfg.max_record_bytes, self.counts):
        error = record if isinstance(record, BadRecord) else None  # already names its place
        if error is None:
          try:
            ids, mask = self.template.encode(self.tokenizer, to_messages(record, cfg.format, cfg.fields))
          except (BadRecord, chat.ChatFormatError) as e:
            error = BadRecord(f'{where}: {e}')
        if error is not None:
          if not cfg.skip_bad_records:
            raise error
          self.counts.add(f'{split}_skipped_bad_records')
          logging.warning('Skipping %s', error)
          continue
        example = self._fit(ids, mask, split)
        if example is None:
          continue
        if split == 'train' and not cfg.eval_files and _held_out(where, cfg.eval_fraction):
          held_out.append(example)
        else:
          examples.append(example)
    return examples, held_out

  def _fit(self, ids, mask, split):
    if len(ids) <= self.seq_len:
      return np.asarray(ids, np.int32), np.asarray(mask, np.int32)
    if self.config.overlong == 'drop':
      self.counts.add(f'{split}_dropped_overlong')
      return None
    ids, mask = ids[:self.seq_len], mask[:self.seq_len]
    if not any(mask[1:]):  # nothing left to learn from
      self.counts.add(f'{split}_dropped_overlong_no_answer')
      return None
    self.counts.add(f'{split}_truncated')
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)

  def dataset(self, examples, shard_index, shard_count, batch_size, train: bool) -> tf.data.Dataset:
    examples = examples[shard_index::shard_count]
    if not examples:
      raise BadRecord(f'host {shard_index} of {shard_count} has no examples')
    lengths = np.array([len(e[0]) for e in examples], np.int64)
    ragged = lambda i: tf.RaggedTensor.from_row_lengths(np.concatenate([e[i] for e in examples]), lengths)
    ds = tf.data.Dataset.from_tensor_slices({'tokens': ragged(0), 'trainable': ragged(1)})
    if train:
      ds = ds.shuffle(len(examples), seed=self.config.seed, reshuffle_each_iteration=True).repeat()
    rows = packing.example_rows(ds)
    if self.config.packing:
      rows = packing.pack_examples(rows, self.seq_len, flush=not train)
    else:
      rows = packing.pad_rows(rows, self.seq_len)
    pad_id = self.tokenizer.pad_id
    return rows.batch(batch_size, drop_remainder=train).map(
        lambda r: packing.row_features(r, pad_id), num_parallel_calls=tf.data.AUTOTUNE
    ).prefetch(tf.data.AUTOTUNE)

  def train_iterator(self, shard_index, shard_count, batch_size):
    return DatasetIterator(self.dataset(self.train_examples, shard_index, shard_count, batch_size, True))

  def eval_batches(self, shard_index, shard_count, batch_size, max_batches):
    if not self.eval_examples:
      return []
    ds = self.dataset(self.eval_examples, shard_index, shard_count, batch_size, False)
    if max_batches:
      ds = ds.take(max_batches)
    return [pad_batch(b, batch_size) for b in DatasetIterator(ds)]


def _held_out(where: str, fraction: float) -> bool:
  """A fixed pseudo-random share of records, by file name and line (not by folder)."""
  key = where.rsplit('/', 1)[-1].encode()
  return fraction > 0 and int(hashlib.sha256(key).hexdigest(), 16) % 10_000 < fraction * 10_000

"""The preference-tuning input pipeline (train.dpo): (prompt, chosen, rejected) records -> chat template ->
two token sequences per pair, trained on the completions only -> rows of whole pairs.

Records follow TRL's conventions, in JSONL, JSON or Parquet files (as for SFT), with the field names of
`config.data.fields` (prompt, chosen, rejected; role and content inside messages):
  conversational  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}: the prompt a
                  conversation (ending where the answer starts), chosen and rejected the assistant
                  turn(s) that continue it. Without a prompt field, the prompt is the longest common
                  prefix of the two conversations (TRL's implicit prompt).
  standard        {"prompt": "...", "chosen": "...", "rejected": "..."}: strings, rendered as a user
                  message and the assistant's answer (TRL would concatenate them without a template).
Each side is rendered as prompt + completion by the chat template (`ChatTemplate.completion_example`),
exactly as SFT renders a conversation, with the loss mask on the completion's assistant messages
only. A pair is one packed example of two segments: the chosen sequence, then the rejected one (batch
keys `pair_ids`, `chosen`: data/batch.py), so both sides are always in the same row and batch.

Length: a prompt longer than `data.max_prompt_len` (0: no limit) is cut to its last tokens, or its pair
dropped (`data.overlong`: truncate | drop); a pair longer than `seq_len` has its completions cut from the
end (the longer one first), or is dropped; one whose prompt leaves no room for both completions is
dropped. All counted in the logs. Bad records (a missing field, an empty completion, chosen identical to
rejected) name the file and line, or are skipped and counted with `data.skip_bad_records`.

Batches mark each pair with its index (`example_ids`: training pairs first, then held-out ones); the
data holds nothing of a model: the trainer computes the reference model's log-probabilities of the
pairs by that index and joins them to the batches (train/reference_pass.py), which also takes the
index out.
"""

import hashlib
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from data import chat, mixture, packing
from data.batch import pad_batch
from data.config import OVERLONG_POLICIES, PREFERENCE_FORMATS
from data.instructions import message_list, role_map
from data.records import BadRecord, Counters
from data.sft import in_held_out_share, parsed_records
from data.tokenizer import load_tokenizer

SIDES = ('chosen', 'rejected')


def _messages(value: Any, name: str, role: str, fields: Any, roles: dict[str, str] | None
              ) -> list[dict[str, str]]:
  """A record's field as a list of messages (their roles renamed by `roles`): a string is one message of
  `role`."""
  key = fields[name]
  if isinstance(value, str):
    return [{'role': role, 'content': value}]
  if not isinstance(value, list):
    raise BadRecord(f'field {key!r} (config.data.fields.{name}) must be a string or a list of messages, '
                    f'got {type(value).__name__}')
  return message_list(value, fields, f'field {key!r}: ', roles)


def to_pair(record: Any, fields: Any, roles: dict[str, str] | None = None
            ) -> tuple[list[dict], list[dict], list[dict]]:
  """One record -> (prompt, chosen, rejected) messages, their roles renamed by `roles`
  (data/instructions.py role_map: config.data.roles)."""
  if not isinstance(record, dict):
    raise BadRecord(f'expected a JSON object, got {type(record).__name__}')
  for name in SIDES:
    if fields[name] not in record:
      raise BadRecord(f'missing field {fields[name]!r} (config.data.fields.{name}); record has '
                      f'{sorted(record)}')
  chosen, rejected = (_messages(record[fields[n]], n, 'assistant', fields, roles) for n in SIDES)
  if fields['prompt'] in record:
    prompt = _messages(record[fields['prompt']], 'prompt', 'user', fields, roles)
  elif all(isinstance(record[fields[n]], list) for n in SIDES):  # implicit: the shared beginning
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
      n += 1
    prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
  else:
    raise BadRecord(f'missing field {fields["prompt"]!r} (config.data.fields.prompt): without it, chosen '
                    'and rejected must be conversations that share their prompt')
  for name, side in zip(SIDES, (chosen, rejected)):
    if not side or not any(isinstance(m['content'], str) and m['content'].strip() for m in side):
      raise BadRecord(f'{name} is an empty completion')
    if not any(m['role'] == 'assistant' for m in side):
      raise BadRecord(f'{name} has no assistant message: nothing to train')
  if chosen == rejected:
    raise BadRecord('chosen and rejected are identical')
  return prompt, chosen, rejected


def _completion_split(room: int, chosen: int, rejected: int) -> tuple[int, int]:
  """Completion lengths that fit `room` tokens together: the longer one is cut first."""
  if chosen + rejected <= room:
    return chosen, rejected
  half = room // 2
  if chosen <= half:
    return chosen, room - chosen
  if rejected <= room - half:
    return room - rejected, rejected
  return half, room - half


class PreferenceData:
  """A DataSource (see train/loop.py) of preference-pair batches, built from `config.data`."""

  def __init__(self, data_config: Any, seq_len: int):
    self.config, self.seq_len = data_config, seq_len
    self.tokenizer = load_tokenizer(data_config.tokenizer)
    self.template = chat.from_config(data_config, self.tokenizer)
    self.counts = Counters()
    self.sources = mixture.sources(data_config)
    self._train_iterator = None
    self.train_sets, self.eval_sets = [], []  # per source: pairs (ids, mask, chosen length)
    for source in self.sources:
      cfg = source.config
      if cfg.format not in PREFERENCE_FORMATS:
        raise ValueError(f'config.data.format must be one of {PREFERENCE_FORMATS} for preference tuning, '
                         f'got {cfg.format!r}')
      if cfg.overlong not in OVERLONG_POLICIES:
        raise ValueError(f'config.data.overlong must be one of {OVERLONG_POLICIES}, got {cfg.overlong!r}')
      if cfg.max_prompt_len < 0:
        raise ValueError(f'config.data.max_prompt_len must be >= 0, got {cfg.max_prompt_len}')
      train, held_out = self._load(cfg, cfg.train_files, 'train')
      if cfg.eval_files:
        held_out = self._load(cfg, cfg.eval_files, 'eval')[0]
      if not train:
        raise BadRecord(f'no usable preference pairs in {cfg.train_files}')
      self.train_sets.append(train)
      self.eval_sets.append(held_out)
    self.train_pairs = [p for pairs in self.train_sets for p in pairs]
    self.eval_pairs = [p for pairs in self.eval_sets for p in pairs]
    logging.info('Preference data: %d train and %d eval pairs; %s', len(self.train_pairs),
                 len(self.eval_pairs),
                 ', '.join(f'{k} {v}' for k, v in sorted(self.stats().items())) or 'nothing skipped')

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  def stats(self) -> dict[str, int]:
    tokens = self._train_iterator.tokens_seen() if self._train_iterator else {}
    return {**self.counts.snapshot(), **tokens}

  def fingerprint(self) -> str:
    """A hash of every pair's tokens and masks, train then eval: what a reference table belongs to."""
    h = hashlib.sha256()
    for ids, mask, n_chosen in self.train_pairs + self.eval_pairs:
      h.update(np.asarray([len(ids), n_chosen], np.int64).tobytes())
      h.update(ids.tobytes())
      h.update(mask.tobytes())
    return h.hexdigest()

  def _load(self, cfg: Any, patterns: str, split: str):
    """(pairs, held-out pairs) of one source; the split by `eval_fraction` only applies without
    eval_files."""
    pairs, held_out = [], []
    roles = role_map(cfg)
    for where, pair in parsed_records(patterns, cfg, self.counts, split,
                                      lambda record: self._fit(self._render(record, cfg, roles), split,
                                                               cfg)):
      if pair is None:
        continue
      if split == 'train' and not cfg.eval_files and in_held_out_share(where, cfg.eval_fraction):
        held_out.append(pair)
      else:
        pairs.append(pair)
    return pairs, held_out

  def _render(self, record: Any, cfg: Any, roles: dict[str, str]) -> list[chat.Example]:
    """A record's two sides, each rendered as prompt + completion, trained on the completion only."""
    prompt, chosen, rejected = to_pair(record, cfg.fields, roles)
    sides = [self.template.completion_example(prompt, side) for side in (chosen, rejected)]
    for name, side in zip(SIDES, sides):
      if not any(side.mask):
        raise BadRecord(f'chat template {self.template.name} trains no token of {name}')
      if side.mask[0]:
        raise BadRecord(f'chat template {self.template.name} renders {name} with nothing before '
                        'its first trained token')
    if sides[0].ids == sides[1].ids:
      raise BadRecord(f'chosen and rejected are identical once rendered (chat template '
                      f'{self.template.name})')
    return sides

  def _fit(self, sides: Sequence[chat.Example], split: str, cfg: Any):
    """(ids, mask, chosen length) of the pair as it goes into a row, or None if it is dropped."""
    drop = cfg.overlong == 'drop'
    seqs = [(np.asarray(s.ids, np.int32), np.asarray(s.mask, np.int32)) for s in sides]
    prompts = [int(np.argmax(mask)) for _, mask in seqs]  # tokens before the first trained one
    limit = cfg.max_prompt_len
    if limit and max(prompts) > limit:
      if drop:
        self.counts.add(f'{split}_dropped_overlong')
        return None
      seqs = [(ids[max(p - limit, 0):], mask[max(p - limit, 0):]) for (ids, mask), p in zip(seqs, prompts)]
      prompts = [min(p, limit) for p in prompts]
      self.counts.add(f'{split}_prompt_truncated')
    if sum(len(ids) for ids, _ in seqs) > self.seq_len:
      room = self.seq_len - sum(prompts)
      if drop or room < 2:
        self.counts.add(f'{split}_dropped_overlong' if drop else f'{split}_dropped_overlong_no_answer')
        return None
      kept = _completion_split(room, *(len(ids) - p for (ids, _), p in zip(seqs, prompts)))
      seqs = [(ids[:p + k], mask[:p + k]) for (ids, mask), p, k in zip(seqs, prompts, kept)]
      self.counts.add(f'{split}_truncated')
    (c_ids, c_mask), (r_ids, r_mask) = seqs
    return np.concatenate([c_ids, r_ids]), np.concatenate([c_mask, r_mask]), len(c_ids)

  # -- rows and batches ---------------------------------------------------------------------------

  def _rows(self, pairs, first_id: int, source: mixture.Source, shard_index, shard_count, train: bool
            ) -> tf.data.Dataset:
    """One source's rows of whole pairs: for training shuffled and endless, else one ordered pass."""
    ids = np.arange(first_id, first_id + len(pairs))[shard_index::shard_count]
    pairs = pairs[shard_index::shard_count]
    if not pairs:
      raise BadRecord(f'host {shard_index} of {shard_count} has no preference pairs'
                      + f' of source {source.name!r}' * bool(source.name))
    lengths = np.array([len(p[0]) for p in pairs], np.int64)
    index = [np.arange(n) for n in lengths]
    features = {
        'tokens': [p[0] for p in pairs],
        'trainable': [p[1] for p in pairs],
        'starts': [((i == 0) | (i == p[2])).astype(np.int32) for i, p in zip(index, pairs)],
        'chosen': [(i < p[2]).astype(np.int32) for i, p in zip(index, pairs)],
        'pair_starts': [(i == 0).astype(np.int32) for i in index],
        'example_ids': [np.full(n, e, np.int32) for n, e in zip(lengths, ids)],
    }
    ds = tf.data.Dataset.from_tensor_slices(
        {k: tf.RaggedTensor.from_row_lengths(np.concatenate(v), lengths) for k, v in features.items()})
    if train:
      ds = ds.shuffle(len(pairs), seed=source.seed, reshuffle_each_iteration=True).repeat()
    rows = ds.map(lambda p: {**p, 'valid': tf.ones_like(p['tokens'])})
    if self.config.packing:
      return packing.pack_examples(rows, self.seq_len, flush=not train)
    return packing.pad_rows(rows, self.seq_len)

  def dataset(self, split: str, shard_index: int, shard_count: int, batch_size: int) -> tf.data.Dataset:
    """Batches of rows, each pair marked with its index (`example_ids`: train pairs first, then eval
    pairs). 'train' is shuffled and endless; 'eval' and 'train_pass' are one ordered pass."""
    train = split == 'train'
    sets = self.train_sets if split in ('train', 'train_pass') else self.eval_sets
    first = 0 if sets is self.train_sets else len(self.train_pairs)
    rows = []
    for i, (source, pairs) in enumerate(zip(self.sources, sets)):
      if pairs:
        rows.append((i, self._rows(pairs, first, source, shard_index, shard_count, train)))
      first += len(pairs)
    ds = mixture.batches(rows, [s.weight for s in self.sources] if train else None, self.config.seed,
                         shard_index, batch_size, self.tokenizer.pad_id, bool(self.config.mixture))

    def pair_ids(batch):
      starts = batch.pop('pair_starts')
      return {**batch, 'pair_ids': tf.cumsum(starts, axis=1) * tf.cast(batch['segment_ids'] > 0, tf.int32)}
    return ds.map(pair_ids)

  def has_eval(self) -> bool:
    return bool(self.eval_pairs)

  def train_iterator(self, shard_index, shard_count, batch_size):
    """Shuffled, endless batches of the training pairs, with `example_ids`."""
    self._train_iterator = mixture.Iterator(self.dataset('train', shard_index, shard_count, batch_size),
                                            [s.name for s in self.sources if s.name])
    return self._train_iterator

  def eval_batches(self, shard_index, shard_count, batch_size, max_batches):
    """This host's held-out batches (at most `max_batches`; 0: all), with `example_ids`."""
    return list(self.ordered_batches('eval', shard_index, shard_count, batch_size, max_batches))

  def ordered_batches(self, split: str, shard_index, shard_count, batch_size, max_batches: int = 0
                      ) -> Iterator[dict[str, np.ndarray]]:
    """This host's batches of one ordered pass over the 'eval' or the 'train_pass' (training) pairs,
    with `example_ids`, padded to `batch_size` rows: what the reference pass reads."""
    if not (self.eval_pairs if split == 'eval' else self.train_pairs):
      return
    ds = self.dataset(split, shard_index, shard_count, batch_size)
    if max_batches:
      ds = ds.take(max_batches)
    for batch in mixture.Iterator(ds):
      yield pad_batch(batch, batch_size)


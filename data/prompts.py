"""Prompts for reinforcement learning from rewards (train.grpo): instruction records as generation
prompts, with their columns for the reward functions, in a deterministic order that a step number
alone locates.

Records are those of instruction tuning (data/instructions.py: chat, sharegpt, prompt_completion or
alpaca, as JSON, JSONL or Parquet, every Parquet column read; field names under config.data.fields,
role names under config.data.roles). A record's prompt is its conversation up
to its last user message, rendered with the chat template and its generation prompt; its reference
answer (the `reference` column) is the content of the last assistant message, where there is one.
Every field of the record is a column too (a chat record's `messages` included). A prompt longer than
`max_prompt_len` tokens is dropped and counted.

The order: each epoch is a permutation of the prompts drawn from (data.seed, epoch), and step s takes
the prompts at positions [s * P, (s + 1) * P) of the epochs laid end to end (P prompts per step), each
host the contiguous share of them that its batch rows hold. So the input position of a run is its step
number: a resumed run takes exactly the prompts it would have taken. No TensorFlow.
"""

import dataclasses
from typing import Any

import numpy as np
from absl import logging

from data import chat, records
from data.config import CHAT_FORMATS, SFT_FORMATS
from data.files import resolve_files
from data.instructions import read_records, role_map, to_messages
from data.records import BadRecord
from data.tokenizer import load_tokenizer


@dataclasses.dataclass(frozen=True)
class Prompt:
  where: str                 # file:line (Parquet: file, row group and row) of its record
  ids: tuple[int, ...]       # the rendered prompt, with the generation prompt
  prompt: Any                # for reward functions: the user's text, or the messages (chat records)
  columns: dict[str, Any]    # the record's fields, and `reference`


class PromptData:
  """The prompts of `config.data.train_files` (and held-out conversations of `eval_files`)."""

  def __init__(self, data_config: Any, max_prompt_len: int):
    if data_config.format not in SFT_FORMATS:
      raise ValueError(f'config.data.format must be one of {SFT_FORMATS} for train.grpo (prompts are '
                       f'instruction records), got {data_config.format!r}')
    if data_config.get('mixture'):
      raise ValueError('train.grpo reads one prompt set: set config.data.train_files, not data.mixture')
    self.config = data_config
    self.tokenizer = load_tokenizer(data_config.tokenizer)
    self.template = chat.from_config(data_config, self.tokenizer)
    self.max_prompt_len = max_prompt_len
    self.counts = records.Counters()
    self.prompts = self._load(data_config.train_files, 'train')
    if not self.prompts:
      raise BadRecord(f'no usable prompts in {data_config.train_files} (config.data.train_files)'
                      + (f': all {self.counts.snapshot()["prompts_too_long"]} are longer than '
                         f'{max_prompt_len} tokens' if self.counts.snapshot().get('prompts_too_long')
                         else ''))
    # The held-out records as (where, messages), for evaluations that generate (train/evaluation.py).
    self.eval_conversations = self._conversations(data_config.eval_files) if data_config.eval_files else []
    logging.info('Prompts: %d for training, %d held-out conversations; %s', len(self.prompts),
                 len(self.eval_conversations),
                 ', '.join(f'{k} {v}' for k, v in sorted(self.stats().items())) or 'none dropped')

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  def stats(self) -> dict[str, int]:
    return self.counts.snapshot()

  def _records(self, patterns: str):
    roles = role_map(self.config)
    for path in resolve_files(patterns):
      for where, record in read_records(path, self.config, self.counts, every_column=True):
        if isinstance(record, BadRecord):
          if self.config.skip_bad_records:
            self.counts.add('bad_records_skipped')
            continue
          raise record
        try:
          yield where, record, to_messages(record, self.config.format, self.config.fields, roles)
        except BadRecord as e:
          if self.config.skip_bad_records:
            self.counts.add('bad_records_skipped')
            continue
          raise BadRecord(f'{where}: {e}') from None

  def _load(self, patterns: str, split: str) -> list[Prompt]:
    prompts = []
    for where, record, messages in self._records(patterns):
      reference = messages[-1]['content'] if messages[-1]['role'] == 'assistant' else ''
      asked = messages[:-1] if messages[-1]['role'] == 'assistant' else messages
      try:
        ids = self.template.prompt_ids(asked)
      except ValueError as e:  # data/chat.py's ChatFormatError
        raise BadRecord(f'{where}: {e}') from None
      if self.max_prompt_len and len(ids) > self.max_prompt_len:
        self.counts.add(f'{split}_prompts_too_long' if split != 'train' else 'prompts_too_long')
        continue
      prompt = asked if self.config.format in CHAT_FORMATS else asked[-1]['content']
      prompts.append(Prompt(where, tuple(ids), prompt, {**record, 'reference': reference}))
    return prompts

  def _conversations(self, patterns: str) -> list[tuple[str, list[dict]]]:
    return [(where, messages) for where, _, messages in self._records(patterns)
            if messages[-1]['role'] == 'assistant']

  def order(self, epoch: int) -> np.ndarray:
    """The permutation of the prompts in `epoch`."""
    return np.random.default_rng([self.config.seed, epoch]).permutation(len(self.prompts))

  def at_step(self, step: int, prompts_per_step: int, shard_index: int = 0,
              shard_count: int = 1) -> list[Prompt]:
    """This host's share of the prompts of step `step` (0-based): every host takes P / shard_count."""
    if prompts_per_step % shard_count:
      raise ValueError(f'{prompts_per_step} prompts per step do not divide among {shard_count} hosts')
    share = prompts_per_step // shard_count
    first = step * prompts_per_step + shard_index * share
    out, n, cached = [], len(self.prompts), {}
    for position in range(first, first + share):
      epoch = position // n
      if epoch not in cached:
        cached[epoch] = self.order(epoch)
      out.append(self.prompts[cached[epoch][position % n]])
    return out

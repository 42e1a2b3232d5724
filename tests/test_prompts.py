"""GRPO's prompt sets (data/prompts.py): records as rendered prompts with their columns, a step's
prompts located by the step number alone, shared out among hosts."""

import json

import pytest

from data import config as data_config
from data.prompts import PromptData
from data.records import BadRecord
from tests.tokenizers_for_tests import make_sp_tokenizer

pytestmark = pytest.mark.unit


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  return make_sp_tokenizer(tmp_path_factory.mktemp('tok') / 'sp.model')


def _config(tokenizer, path, fmt='prompt_completion', **overrides):
  cfg = data_config.get_config()
  cfg.update(dict(format=fmt, train_files=str(path), tokenizer=tokenizer, chat_template='llama2',
                  **overrides))
  return cfg


def _write(path, records):
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  return path


def test_records_become_prompts_with_their_columns(tokenizer, tmp_path):
  path = _write(tmp_path / 'p.jsonl', [{'prompt': f'What is {i} + {i}?', 'completion': str(2 * i), 'id': i}
                                       for i in range(5)])
  data = PromptData(_config(tokenizer, path), max_prompt_len=64)
  first = data.prompts[0]
  assert first.where == f'{path}:1' and first.prompt == 'What is 0 + 0?'
  assert first.columns == {'prompt': 'What is 0 + 0?', 'completion': '0', 'id': 0, 'reference': '0'}
  assert list(first.ids) == data.template.prompt_ids([{'role': 'user', 'content': 'What is 0 + 0?'}])

  chat = _write(tmp_path / 'c.jsonl', [{'messages': [{'role': 'system', 'content': 'Be brief.'},
                                                     {'role': 'user', 'content': 'Hi?'},
                                                     {'role': 'assistant', 'content': 'Hello'}]},
                                       {'messages': [{'role': 'user', 'content': 'Bye?'}]}])
  data = PromptData(_config(tokenizer, chat, 'chat'), max_prompt_len=64)
  assert data.prompts[0].prompt == [{'role': 'system', 'content': 'Be brief.'},
                                    {'role': 'user', 'content': 'Hi?'}]
  assert [p.columns['reference'] for p in data.prompts] == ['Hello', '']


def test_long_prompts_are_dropped_and_counted(tokenizer, tmp_path):
  path = _write(tmp_path / 'p.jsonl', [{'prompt': 'short', 'completion': 'a'},
                                       {'prompt': 'word ' * 200, 'completion': 'b'}])
  data = PromptData(_config(tokenizer, path), max_prompt_len=32)
  assert len(data.prompts) == 1 and data.stats() == {'prompts_too_long': 1}
  with pytest.raises(BadRecord, match=r'no usable prompts .*all 2 are longer than 2 tokens'):
    PromptData(_config(tokenizer, path), max_prompt_len=2)


def test_a_step_number_locates_its_prompts_and_hosts_share_them(tokenizer, tmp_path):
  path = _write(tmp_path / 'p.jsonl', [{'prompt': f'q{i}', 'completion': str(i)} for i in range(7)])
  data = PromptData(_config(tokenizer, path, seed=3), max_prompt_len=32)
  steps = [[p.columns['completion'] for p in data.at_step(s, 4)] for s in range(7)]
  # Four epochs of seven prompts in 28 positions: every prompt four times, each epoch a permutation.
  flat = sum(steps, [])
  for epoch in range(4):
    assert sorted(flat[7 * epoch:7 * epoch + 7]) == [str(i) for i in range(7)]
  assert flat[:7] != flat[7:14]  # a new order each epoch
  again = PromptData(_config(tokenizer, path, seed=3), max_prompt_len=32)
  assert [p.columns['completion'] for p in again.at_step(5, 4)] == steps[5]
  halves = [data.at_step(2, 4, shard, 2) for shard in (0, 1)]
  assert [p.columns['completion'] for p in halves[0] + halves[1]] == steps[2]
  with pytest.raises(ValueError, match='4 prompts per step do not divide among 3 hosts'):
    data.at_step(0, 4, 0, 3)


def test_held_out_conversations_and_bad_records(tokenizer, tmp_path):
  train = _write(tmp_path / 't.jsonl', [{'prompt': 'q', 'completion': 'a'}])
  held_out = _write(tmp_path / 'e.jsonl', [{'prompt': 'q2', 'completion': 'b'}])
  data = PromptData(_config(tokenizer, train, eval_files=str(held_out)), max_prompt_len=32)
  assert data.eval_conversations == [(f'{held_out}:1', [{'role': 'user', 'content': 'q2'},
                                                         {'role': 'assistant', 'content': 'b'}])]
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"prompt": "q", "completion": "a"}\n{"prompt": 3}\n')
  with pytest.raises(BadRecord, match=rf"{bad}:2: field 'prompt' must be a string, got int"):
    PromptData(_config(tokenizer, bad), max_prompt_len=32)
  data = PromptData(_config(tokenizer, bad, skip_bad_records=True), max_prompt_len=32)
  assert len(data.prompts) == 1 and data.stats() == {'bad_records_skipped': 1}
  with pytest.raises(ValueError, match='must be one of .* for train.grpo'):
    PromptData(_config(tokenizer, train, 'preference'), max_prompt_len=32)

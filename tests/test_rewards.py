"""Reward functions of train.grpo (train/rewards.py): the built-ins, loading by import path, weights,
and errors that name the function and the record."""

import math
import sys
import types

import numpy as np
import pytest

from train import rewards
from train.rewards import RewardError, Rewards

pytestmark = pytest.mark.unit


def test_exact_match_is_strict_and_the_squad_option_never_rewards_an_empty_answer():
  completions = ['Paris', ' Paris\n', 'paris', 'The', '']
  reference = ['Paris', 'Paris', 'Paris', 'The', 'The']
  assert rewards.exact_match(None, completions, reference) == [1, 1, 0, 1, 0]
  assert rewards.exact_match_squad(None, completions, reference) == [1, 1, 1, 0, 0]


def test_numeric_match_reads_gsm8k_markers_or_the_last_number():
  completions = ['so 3 + 4 = 7', 'The answer is 1,250.', '#### 42 (not 7)', 'no number', '7.0']
  reference = ['#### 7', '1250', 'x\n#### 42', '#### 1', '7']
  assert rewards.numeric_match(None, completions, reference) == [1, 1, 1, 0, 1]
  assert rewards.answer_number('-3.5 and 2') == 2.0


def test_chat_completions_are_messages():
  completion = [{'role': 'assistant', 'content': 'Paris'}]
  assert rewards.exact_match(None, [completion], ['Paris']) == [1.0]
  assert Rewards('format:[A-Z]\\w+').score(['q'], [completion], {}, ['f:1'])[1].tolist() == [1.0]


def test_weighted_functions_by_name_and_import_path(monkeypatch):
  module = types.ModuleType('my_rewards')
  module.length = lambda prompts, completions, **columns: [len(c) / 10 for c in completions]
  monkeypatch.setitem(sys.modules, 'my_rewards', module)
  scorer = Rewards('exact_match, my_rewards:length, format:\\d{1,3}', '2, 1, 0.5')
  table, total = scorer.score(['a', 'b'], ['42', 'xyz'], {'reference': ['42', '7']}, ['f:1', 'f:2'])
  np.testing.assert_allclose(table, [[1, 0], [0.2, 0.3], [1, 0]])
  np.testing.assert_allclose(total, [2 + 0.2 + 0.5, 0.3])


def test_other_columns_reach_the_functions_and_the_compared_column_is_configurable():
  scorer = Rewards('exact_match', column='answer')
  _, total = scorer.score(['q'], ['4'], {'reference': ['x'], 'answer': ['4']}, ['f:1'])
  assert total.tolist() == [1.0]
  with pytest.raises(RewardError, match=r"exact_match raised KeyError: .*no column 'answer'"):
    Rewards('exact_match', column='answer').score(['q'], ['4'], {'reference': ['4']}, ['f:1'])


@pytest.mark.parametrize('function,message', [
    (lambda prompts, completions, **_: 1 / 0, r'reward function bad:f raised ZeroDivisionError: .* of a.jsonl:1 .. a.jsonl:2'),
    (lambda prompts, completions, **_: [1.0], r'bad:f returned 1 values for 2 completions .*one number per completion'),
    (lambda prompts, completions, **_: [1.0, math.nan], r'bad:f returned nan for the completion of a.jsonl:2; rewards must be finite'),
    (lambda prompts, completions, **_: [1.0, 'yes'], r"bad:f returned 'yes' for the completion of a.jsonl:2; expected a number"),
    (lambda prompts, completions, **_: None, r'bad:f returned None for 2 completions'),
])
def test_a_bad_reward_function_is_named_with_the_record(monkeypatch, function, message):
  monkeypatch.setitem(sys.modules, 'bad', types.SimpleNamespace(f=function))
  with pytest.raises(RewardError, match=message):
    Rewards('bad:f').score(['p', 'q'], ['a', 'b'], {}, ['a.jsonl:1', 'a.jsonl:2'])


@pytest.mark.parametrize('names,weights,message', [
    ('', '', 'names no reward function'),
    ('exact', '', "'exact' is neither a built-in reward"),
    ('no_such_module_xyz:f', '', "cannot import 'no_such_module_xyz'"),
    ('math:no_such', '', "math has no function 'no_such'"),
    ('exact_match,numeric_match', '1', 'has 1 weights for 2 reward functions'),
    ('exact_match', 'one', 'must be comma-separated numbers'),
    ('format:(', '', 'not a regular expression'),
])
def test_a_bad_reward_setting_is_named(names, weights, message):
  with pytest.raises(ValueError, match=message):
    Rewards(names, weights)

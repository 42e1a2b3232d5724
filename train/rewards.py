"""Reward functions of reinforcement learning from rewards (train.grpo), and scoring a batch with them.

A reward function has TRL's signature, `f(prompts, completions, **columns) -> list[float]`: `prompts`
and `completions` are lists of strings (for chat records, lists of messages, the completion being
`[{'role': 'assistant', 'content': text}]`), and every other column of the prompt records comes as a
keyword argument holding one value per completion (`reference`: each record's reference answer, the
content of its last assistant message). `config.grpo.rewards` names them, comma-separated: a built-in
below, or `module:function` (any importable module, e.g. `my_rewards:brevity`), each with a weight
(`config.grpo.reward_weights`). A function that raises, returns a list of another length, or a value
that is not a finite number is an error naming the function and the record; nothing is written.

Built-ins (`reference` is the compared column unless `config.grpo.reward_column` names another):
  exact_match        1 if the completion equals the reference after stripping surrounding white space,
                     else 0 (strict: case, punctuation and articles count);
  exact_match_squad  1 if they are equal after SQuAD's normalisation (lower case, no punctuation or
                     articles), else 0; never rewards an empty answer, even where the reference
                     normalises to nothing ("The");
  numeric_match      1 if the completion's answer number equals the reference's: the number after
                     GSM8K's `#### ` marker where there is one, else the last number in the text;
  format:REGEX       1 if the whole completion matches the regular expression REGEX, else 0.
"""

import functools
import importlib
import math
import re
from typing import Any, Callable, Sequence

import numpy as np

from model.evaluation.task_metrics import normalize_answer

RewardFunction = Callable[..., list[float]]


def completion_text(completion: Any) -> str:
  """The text of a completion: a string, or the content of a list of messages (chat records)."""
  if isinstance(completion, str):
    return completion
  return ''.join(m.get('content', '') for m in completion)


def exact_match(prompts, completions, reference, **_) -> list[float]:
  del prompts
  return [float(completion_text(c).strip() == str(r).strip()) for c, r in zip(completions, reference)]


def exact_match_squad(prompts, completions, reference, **_) -> list[float]:
  del prompts
  out = []
  for c, r in zip(completions, reference):
    answer = normalize_answer(completion_text(c))
    out.append(float(bool(answer) and answer == normalize_answer(str(r))))
  return out


_NUMBER = re.compile(r'-?\d[\d,]*(?:\.\d+)?')


def answer_number(text: str) -> float | None:
  """The number after GSM8K's '#### ' marker, else the last number in `text` (commas ignored)."""
  marked = text.split('####')[-1] if '####' in text else text
  numbers = _NUMBER.findall(marked)
  if not numbers:
    return None
  try:
    return float(numbers[0 if '####' in text else -1].replace(',', ''))
  except ValueError:
    return None


def numeric_match(prompts, completions, reference, **_) -> list[float]:
  del prompts
  out = []
  for c, r in zip(completions, reference):
    got, expected = answer_number(completion_text(c)), answer_number(str(r))
    out.append(float(got is not None and expected is not None and got == expected))
  return out


def format_match(pattern: str) -> RewardFunction:
  """`format:REGEX`: 1 where the whole completion matches `pattern`."""
  try:
    regex = re.compile(pattern, re.DOTALL)
  except re.error as e:
    raise ValueError(f'format:{pattern}: not a regular expression ({e})') from None

  def reward(prompts, completions, **_) -> list[float]:
    del prompts
    return [float(regex.fullmatch(completion_text(c)) is not None) for c in completions]
  reward.__name__ = f'format:{pattern}'
  return reward


BUILT_IN = {'exact_match': exact_match, 'exact_match_squad': exact_match_squad,
            'numeric_match': numeric_match}


def _with_column(function: RewardFunction, column: str) -> RewardFunction:
  """A built-in that compares against `column` instead of `reference`."""
  @functools.wraps(function)
  def reward(prompts, completions, **columns):
    if column not in columns:
      raise KeyError(f'the records have no column {column!r} (config.grpo.reward_column); they have '
                     f'{sorted(columns)}')
    return function(prompts, completions, reference=columns[column])
  return reward


def load(name: str, column: str = 'reference') -> RewardFunction:
  """The reward function `name` names: a built-in, `format:REGEX`, or `module:function`."""
  name = name.strip()
  if name.startswith('format:'):
    return format_match(name[len('format:'):])
  if name in BUILT_IN:
    return BUILT_IN[name] if column == 'reference' else _with_column(BUILT_IN[name], column)
  module_name, _, attribute = name.partition(':')
  if not attribute:
    raise ValueError(f'config.grpo.rewards: {name!r} is neither a built-in reward ({", ".join(BUILT_IN)}, '
                     'format:REGEX) nor module:function')
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f'config.grpo.rewards: cannot import {module_name!r} for {name!r} ({e})') from None
  function = getattr(module, attribute, None)
  if not callable(function):
    raise ValueError(f'config.grpo.rewards: {module_name} has no function {attribute!r}')
  return function


class RewardError(ValueError):
  """A reward function failed or returned something other than one finite number per completion."""


class Rewards:
  """The weighted reward functions of a run: `score` gives each function's rewards and their sum."""

  def __init__(self, names: str, weights: str = '', column: str = 'reference'):
    self.names = [n.strip() for n in _split(names) if n.strip()]
    if not self.names:
      raise ValueError('config.grpo.rewards names no reward function')
    self.functions = [load(n, column) for n in self.names]
    parts = [w.strip() for w in weights.split(',') if w.strip()] if weights else []
    if parts and len(parts) != len(self.names):
      raise ValueError(f'config.grpo.reward_weights has {len(parts)} weights for {len(self.names)} reward '
                       f'functions ({self.names})')
    try:
      self.weights = np.asarray([float(w) for w in parts] if parts else [1.0] * len(self.names),
                                np.float32)
    except ValueError:
      raise ValueError(f'config.grpo.reward_weights must be comma-separated numbers, got {weights!r}') from None

  def score(self, prompts: Sequence[Any], completions: Sequence[Any], columns: dict[str, Sequence[Any]],
            where: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(per function rewards [functions, n], weighted sum [n]) of n completions. `where` names each
    completion's record (file:line), for errors."""
    n = len(completions)
    table = np.zeros((len(self.functions), n), np.float32)
    for i, (name, function) in enumerate(zip(self.names, self.functions)):
      try:
        values = function(prompts=list(prompts), completions=list(completions),
                          **{k: list(v) for k, v in columns.items()})
      except Exception as e:  # pylint: disable=broad-exception-caught  (the user's code: name it)
        raise RewardError(f'reward function {name} raised {type(e).__name__}: {e} (on the completions '
                          f'of {where[0]} .. {where[-1]})') from e
      if values is None or not hasattr(values, '__len__') or len(values) != n:
        got = f'{len(values)} values' if hasattr(values, '__len__') else repr(values)[:80]
        raise RewardError(f'reward function {name} returned {got} for {n} completions (of {where[0]} '
                          f'.. {where[-1]}); it must return one number per completion')
      for j, value in enumerate(values):
        try:
          value = float(value)
        except (TypeError, ValueError):
          raise RewardError(f'reward function {name} returned {value!r} for the completion of '
                            f'{where[j]}; expected a number') from None
        if not math.isfinite(value):
          raise RewardError(f'reward function {name} returned {value} for the completion of {where[j]}; '
                            'rewards must be finite')
        table[i, j] = value
    return table, (self.weights[:, None] * table).sum(axis=0)


def _split(names: str) -> list[str]:
  """Comma-separated names; a comma inside `format:REGEX` belongs to the regular expression when it
  cannot start another name (`format:a{1,3}` stays whole)."""
  out: list[str] = []
  for part in names.split(','):
    if out and out[-1].strip().startswith('format:') and not _starts_name(part):
      out[-1] += ',' + part
    else:
      out.append(part)
  return out


def _starts_name(part: str) -> bool:
  part = part.strip()
  return part in BUILT_IN or part.startswith('format:') or bool(re.fullmatch(r'[\w.]+:\w+', part))

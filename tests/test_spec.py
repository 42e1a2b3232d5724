"""The run spec (train/spec.py): every shipped config converts, bad values and misspelled keys are named
with what was expected, and the facts about keys (defaults, resumability) come from the fields."""

import dataclasses
import glob
import importlib
import os

import pytest

from configs import default
from train import spec as spec_lib
from train.spec import ConfigError, Spec

pytestmark = pytest.mark.unit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = ('', 'sft', 'dpo', 'sft,lora', 'dpo,lora')


def _configs():
  for path in sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py'))):
    name = os.path.splitext(os.path.basename(path))[0]
    if name in ('__init__', 'scale'):
      continue
    module = importlib.import_module(f'configs.{name}')
    if hasattr(module, 'SLICES'):
      slices = list(module.SLICES) + list(getattr(module, 'LORA_SLICES', {}))
      for option in OPTIONS:
        for slice_name in slices:
          if ('lora' in option) == (slice_name in getattr(module, 'LORA_SLICES', {})):
            yield f'{name}:{slice_name},{option}', lambda m=module, o=f'{slice_name},{option}': m.get_config(o)
    else:
      yield name, module.get_config


@pytest.mark.parametrize('name,make', list(_configs()), ids=lambda x: x if isinstance(x, str) else '')
def test_every_shipped_config_converts_into_a_spec(name, make):
  spec = Spec.of(make())
  assert spec.train.steps > 0 and spec.optimizer.lr > 0, name
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.train.steps = 1


def test_the_defaults_are_the_sections_defaults():
  spec = Spec.of(default.get_config())
  assert spec.train == spec_lib.Train() and spec.optimizer == spec_lib.Optimizer()
  assert spec.checkpoint == spec_lib.Checkpoint() and spec.eval == spec_lib.Eval()
  assert spec.dpo == spec_lib.Dpo() and spec.mesh == spec_lib.Mesh()


def test_every_problem_is_named_at_once_with_what_was_expected():
  config = default.get_config()
  config.train.steps = 0
  config.optimizer.lr = 0.0
  config.checkpoint.keep = -1
  config.train.early_stopping.mode = 'up'
  with pytest.raises(ConfigError) as e:
    Spec.of(config)
  assert str(e.value).split('\n  ')[1:] == [
      'train.steps must be positive, got 0',
      "train.early_stopping.mode must be one of ('', 'min', 'max'), got 'up'",
      'optimizer.lr must be positive, got 0.0 (at 0 the run would train nothing)',
      'checkpoint.keep must be positive, got -1',
  ]


def test_a_misspelled_key_or_section_is_named_with_the_closest_one():
  config = default.get_config()
  config.train.unlock()
  config.train.stpes = 10
  with pytest.raises(ConfigError, match=r'config.train.stpes is not a setting: did you mean '
                                        r'config.train.steps\?'):
    Spec.of(config)
  config = default.get_config()
  config.optimiser = {'lr': 1.0}
  with pytest.raises(ConfigError, match=r'config.optimiser is not a section: did you mean config.optimizer\?'):
    Spec.of(config)


def test_the_dpo_section_is_checked_for_preference_tuning_only():
  config = default.get_config()
  config.dpo.beta = 0.0
  Spec.of(config)  # language modeling: the dpo section is not used
  config.train.objective = 'dpo'
  config.data.format = 'preference'
  with pytest.raises(ConfigError, match='dpo.beta must be positive, got 0.0'):
    Spec.of(config)


def test_what_a_resumed_run_may_change_comes_from_the_fields():
  keys = Spec.resumable_keys()
  assert {'train.steps', 'train.log_every', 'train.early_stopping.', 'checkpoint.', 'eval.', 'mesh.',
          'init_from'} <= set(keys)
  assert not {'train.batch_size', 'train.seq_len', 'optimizer.lr', 'train.seed'} & {
      k.rstrip('.') for k in keys}

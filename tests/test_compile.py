"""Compiling the real train step for a TPU slice on this CPU-only machine (libtpu, compile-only devices)."""

import dataclasses
import os

import pytest

from configs import scale, tiny
from tests.builders import micro_model_config
from tests.cli import ROOT, run_cli
from train import topology as compile_lib

pytestmark = pytest.mark.unit


def test_parse_topology():
  t = compile_lib.parse_topology('v5p-8')
  assert (t.chip.name, t.grid, t.num_chips, t.chip.hbm_gib) == ('v5p', '2x2x1', 4, 95)
  assert compile_lib.parse_topology('v4-8').num_chips == 4
  assert compile_lib.parse_topology('v5e-8').grid == '2x4'
  assert compile_lib.parse_topology('v5litepod-16').num_chips == 16
  assert compile_lib.parse_topology('v5p:2x2x2').num_chips == 8
  with pytest.raises(ValueError, match='No standard v5p slice of size 6'):
    compile_lib.parse_topology('v5p-6')
  with pytest.raises(ValueError, match='Unknown topology'):
    compile_lib.parse_topology('h100')


@pytest.fixture(scope='module')
def tiny_report():
  config = tiny.get_config()
  config.train.batch_size, config.train.seq_len = 8, 256
  config.model.scan_layers = True  # as every TPU-sized config
  return compile_lib.compile_step(config, compile_lib.parse_topology('v5e-4'), 'tiny')


def test_tiny_compiles_for_a_tpu_slice(tiny_report):
  r = tiny_report
  assert r.mesh == {'data': 1, 'fsdp': 4, 'tensor': 1}
  assert r.attention == 'splash' and 'tpu_custom_call' in r.custom_calls  # the Pallas kernel
  assert r.fits and 0 < r.total < r.hbm
  # Arguments are this chip's quarter of params + two Adam moments, in float32.
  params = 1_311_872
  assert r.state == pytest.approx(3 * 4 * params / 4, rel=0.01)
  assert r.argument >= r.state and r.temp > 0
  assert 'fits' in r.summary() and 'per chip' in r.summary()


def test_qlora_step_compiles_for_one_chip():
  """The LoRA step over an nf4 base (scanned, rematerialised) compiles for TPU: what trains is the
  adapters, and the frozen base is in the state as codes and scales."""
  config = tiny.get_config()
  config.train.batch_size, config.train.seq_len = 2, 256
  config.model.update(dict(scan_layers=True, remat_policy='full', dtype='bfloat16'))
  config.lora.update(dict(rank=8, base_dtype='nf4'))
  r = compile_lib.compile_step(config, compile_lib.parse_topology('v5e-1'), 'tiny QLoRA')
  assert r.fits, r.summary()
  d, f, layers = 128, 384, 4  # tiny: q 2x64, k/v 1x64, o, gate/up/down
  per_layer = 8 * ((d + 128) + 2 * (d + 64) + (128 + d) + 2 * (d + f) + (f + d))
  assert r.trainable == layers * per_layer
  assert 'LoRA rank 8 on q,k,v,o,gate,up,down over a frozen nf4 base' in r.summary()
  assert f'{r.trainable:,} trainable parameters' in r.summary()


def test_advice_when_it_does_not_fit(tiny_report):
  small_chip = dataclasses.replace(tiny_report.topology.chip, hbm_gib=0.001)
  report = dataclasses.replace(tiny_report, topology=dataclasses.replace(tiny_report.topology,
                                                                          chip=small_chip))
  assert not report.fits and 'does NOT fit' in report.summary()
  advice = compile_lib.advice(report, tiny.get_config())
  assert '--config.model.remat_policy=full' in advice
  assert '--config.optimizer.state_dtype=bfloat16' in advice
  assert 'larger slice' in advice


def test_slice_tip():
  v4 = compile_lib.parse_topology('v4-8')
  assert '--config=configs/llama2_7b.py:v4-8' in compile_lib.slice_tip('configs/llama2_7b.py', v4)
  assert '--config=configs/llama2_7b.py:sft,v4-8' in compile_lib.slice_tip('configs/llama2_7b.py:sft', v4)
  assert '--config=configs/llama2_7b.py:sft,v4-8' in compile_lib.slice_tip(
      'configs/llama2_7b.py:v5e-8,sft', v4)
  assert compile_lib.slice_tip('configs/llama2_7b.py:v4-8', v4) == ''
  assert compile_lib.slice_tip('configs/tiny.py', v4) == ''


def test_config_variants():
  assert compile_lib.sft_variant('configs/llama2_7b.py:v4-8') == 'configs/llama2_7b.py:v4-8,sft'
  assert compile_lib.sft_variant('configs/llama2_7b.py') == 'configs/llama2_7b.py:sft'
  assert compile_lib.sft_variant('configs/tiny.py') is None
  sft = compile_lib.load_config('configs/llama3_8b.py:v5e-8,sft')
  assert sft.data.format == 'chat' and sft.data.chat_template == 'llama3'
  assert sft.train.seq_len == 4096 and sft.mesh.fsdp == -1
  with pytest.raises(ValueError, match='Unknown config option'):
    compile_lib.load_config('configs/llama3_8b.py:v9-8')
  assert compile_lib.step_name(sft) == 'SFT step'
  from data import sft as sft_data  # pylint: disable=import-outside-toplevel  (TensorFlow)
  for fmt in sft_data.SFT_FORMATS:  # the formats the SFT pipeline reads
    sft.data.format = fmt
    assert compile_lib.step_name(sft) == 'SFT step', fmt
  assert compile_lib.step_name(compile_lib.load_config('configs/sft_tiny.py')) == 'SFT step'
  assert compile_lib.step_name(compile_lib.load_config('configs/llama3_8b.py')) == 'pretraining step'


def test_compiles_the_model_of_init_from(tmp_path):
  """train.compile takes the model from config.init_from as training does (train/start.py
  model_config): the state compiled is that checkpoint's model's, not the config's preset's."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from model import abstract_params, count_params  # pylint: disable=import-outside-toplevel
  from model.weights import params as params_lib  # pylint: disable=import-outside-toplevel
  cfg = micro_model_config(dtype='bfloat16', max_seq_len=1024, qk_norm=True)
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_params(cfg))
  params_lib.save_params(str(tmp_path / 'checkpoints'), cfg, zeros)
  config = tiny.get_config()
  config.init_from = str(tmp_path)
  config.train.batch_size, config.train.seq_len = 2, 128
  report = compile_lib.compile_step(config, compile_lib.parse_topology('v5e-1'))
  # float32 parameters and two moments, plus the step counters
  assert report.fits and report.state == pytest.approx(3 * 4 * count_params(cfg), abs=64)


@pytest.mark.e2e
def test_command_line():
  ok = run_cli('train.compile', '--config=configs/tiny.py', '--topology=v5e-1', '--config.train.batch_size=2',
               '--config.train.seq_len=128', '--config.train.steps=10', timeout=600, XLA_FLAGS='')
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert 'fits' in ok.stdout and 'of 16.00 GiB HBM' in ok.stdout


@pytest.mark.slow
def test_dpo_step_compiles_with_the_reference_in_the_state():
  """The preference step compiles for TPU; with the reference model in the step (no LoRA), the state
  holds a frozen copy of the parameters besides the params and two Adam moments."""
  config = compile_lib.load_config('configs/dpo_tiny.py')
  config.init_from = ''
  config.dpo.reference = 'step'
  r = compile_lib.compile_step(config, compile_lib.parse_topology('v5e-4'),
                               compile_lib.step_name(config))
  assert r.fits, r.summary()
  assert r.state == pytest.approx(4 * 4 * 1_311_872 / 4, rel=0.01)
  assert r.summary().startswith('DPO step (sigmoid loss, reference log-probabilities in the step)')
  assert compile_lib.sft_variant('configs/llama3_8b.py:v5p-8,dpo') is None
  dpo = compile_lib.load_config('configs/llama3_8b.py:v6e-1,dpo,lora')
  assert (dpo.train.objective, dpo.data.format, dpo.lora.rank) == ('dpo', 'preference', 16)


@pytest.mark.slow
def test_grpo_train_step_and_rollout_compile_for_a_slice():
  """train.grpo's two programs compile for TPU: the policy-gradient step (with the KL's reference in
  the state) and the rollout, whose report counts the train state resident beside the sampler."""
  config = compile_lib.load_config('configs/grpo_tiny.py')
  config.init_from = ''
  config.grpo.beta = 0.04
  config.model.attention = 'chunked'  # splash wants 128-multiple lengths; the demo's prompts are 48
  slice_ = compile_lib.parse_topology('v5e-4')
  step = compile_lib.compile_step(config, slice_, compile_lib.step_name(config))
  assert step.fits and step.summary().startswith('GRPO train step'), step.summary()
  assert step.state == pytest.approx(4 * 4 * 1_311_872 / 4, rel=0.01)  # params, 2 moments, reference
  rollout = compile_lib.compile_rollout(config, slice_)
  assert rollout.fits and rollout.name == 'GRPO rollout', rollout.summary()
  assert rollout.argument == step.state and rollout.temp > 0
  grpo = compile_lib.load_config('configs/llama3_8b.py:v6e-1,grpo,lora')
  assert (grpo.train.objective, grpo.train.batch_size % grpo.grpo.num_generations) == ('grpo', 0)


def test_every_config_file_and_slice_loads_and_validates():
  """Each configs/*.py (and each of its slice and 'sft' options) builds a valid model and passes the
  checks the training loop makes, on the chips of its slice (one device for the others)."""
  from model import ModelConfig  # pylint: disable=import-outside-toplevel
  from train import validate  # pylint: disable=import-outside-toplevel
  files = sorted(f for f in os.listdir(os.path.join(ROOT, 'configs'))
                 if f.endswith('.py') and f not in ('__init__.py', 'default.py', 'scale.py'))
  assert {'tiny.py', 'llama2_7b.py', 'llama3_8b.py', 'mistral_7b.py', 'qwen2_7b.py'} <= set(files)
  checked = 0
  for file in files:
    path = os.path.join(ROOT, 'configs', file)
    slices = getattr(compile_lib._config_module(path), 'SLICES', {})  # pylint: disable=protected-access
    variants = [(path, 4 if slices else 1)]  # the slice configs default to v5p-8: 4 chips
    variants += [(f'{path}:{o}', compile_lib.parse_topology(s).num_chips)
                 for s in slices for o in (s, f'{s},sft', f'{s},dpo', f'{s},grpo')]
    if slices:  # the 7-8B configs: LoRA and QLoRA slices too
      variants += [(f'{path}:{s},{o},lora', compile_lib.parse_topology(s).num_chips)
                   for s in scale.LORA_SLICES for o in ('sft', 'dpo', 'grpo')]
    for variant, chips in variants:
      config = compile_lib.load_config(variant)
      validate.check(config, ModelConfig.from_dict(config.model), chips,
                     lora=validate.lora_config(config))
      checked += 1
  assert checked >= 5 + 4 * 6 + 4 * 3

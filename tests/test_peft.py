"""LoRA against Hugging Face `peft` itself: a LoRA run's adapters exported as a PEFT folder load onto the
transformers model with the same logits as ours (unmerged), and so do its merged weights; an adapter
made by peft, imported, gives the same logits in flaxlm as in peft."""

import copy
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='torch is not installed (the newest-releases set on Python '
                            '3.12 has only CUDA builds of torch on PyPI)')
transformers = pytest.importorskip('transformers', reason='transformers is not installed')
peft = pytest.importorskip('peft', reason='peft is not installed')

from configs import tiny
from data.synthetic import SyntheticData
from model import Transformer, convert
from model.weights import adapters
from model.weights import params as params_lib
from tests.cli import run_cli
from tests.hf_models import random_llama
from train import loop

pytestmark = [pytest.mark.parity, pytest.mark.e2e]

VOCAB = 160
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 40))


def _logits_hf(model, tokens=TOKENS):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def _logits_ours(ckpt, tokens=TOKENS):
  cfg, lora, params = adapters.load_model(ckpt)
  cfg = dataclasses.replace(cfg, dtype='float32')
  return np.asarray(jax.jit(Transformer(cfg, lora=lora).apply)({'params': params}, tokens)), lora


@pytest.fixture(scope='module')
def base(tmp_path_factory):
  """(transformers Llama with random weights, its folder, our import of it)."""
  root = tmp_path_factory.mktemp('peft')
  model = random_llama(VOCAB)
  model.eval().save_pretrained(root / 'hf')
  convert.import_hf(str(root / 'hf'), str(root / 'ckpt'), 'float32', log=None)
  return model, str(root / 'hf'), str(root / 'ckpt')


@pytest.fixture(scope='module')
def trained(base, tmp_path_factory):
  """A LoRA run (continued pretraining, 4 steps) over the imported model: its workdir."""
  _, _, ckpt = base
  c = tiny.get_config()
  c.model.update({k: v for k, v in dataclasses.asdict(params_lib.load_model_config(ckpt)).items()
                  if k in c.model})
  c.model.update(dict(dtype='float32', scan_layers=True))
  c.data.format = 'synthetic'
  c.train.update(dict(steps=4, batch_size=8, seq_len=32, log_every=1, eval_every=0,
                      eval_at_start=False))
  c.optimizer.update(dict(lr=3e-2, warmup_steps=0, weight_decay=0.0))
  c.lora.update(dict(rank=4, alpha=8.0, targets='q,k,v,o,gate,up,down', rslora=True))
  c.init_from = ckpt
  workdir = str(tmp_path_factory.mktemp('trained'))
  loop.train(c, workdir, SyntheticData(0, 32, VOCAB))
  return workdir


def test_exported_adapter_loads_in_peft_with_our_logits(base, trained, tmp_path):
  model, _, _ = base
  out = tmp_path / 'adapter'
  proc = run_cli('model.convert', 'export-peft', '--ckpt', trained, '--out', out, '--base-name', 'tiny')
  assert proc.returncode == 0, proc.stderr[-3000:]
  config = json.loads((out / 'adapter_config.json').read_text())
  assert (config['r'], config['lora_alpha'], config['use_rslora']) == (4, 8.0, True)
  assert sorted(config['target_modules']) == sorted(
      ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'])
  tuned = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(out)).eval()
  theirs, ours = _logits_hf(tuned), _logits_ours(trained)[0]
  assert np.abs(theirs - _logits_hf(model)).max() > 0.05  # the adapters were loaded and do something
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
  # Merged export: the plain transformers model computes the same.
  convert.export_hf(trained, str(tmp_path / 'merged'), dtype='float32', log=None)
  merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'merged', dtype=torch.float32)
  np.testing.assert_allclose(_logits_hf(merged.eval()), theirs, atol=1e-4, rtol=1e-4)


def test_adapter_made_by_peft_imports_with_the_same_logits(base, tmp_path):
  model, _, ckpt = base
  torch.manual_seed(1)
  made = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
      r=4, lora_alpha=16, target_modules=['q_proj', 'v_proj', 'o_proj', 'down_proj'],
      init_lora_weights=False, task_type='CAUSAL_LM')).eval()  # A and B both random
  made.save_pretrained(tmp_path / 'made')
  proc = run_cli('model.convert', 'import-peft', '--adapter-dir', tmp_path / 'made', '--base', ckpt,
                 '--out', tmp_path / 'imported')
  assert proc.returncode == 0, proc.stderr[-3000:]
  ours, lora = _logits_ours(str(tmp_path / 'imported'))
  assert (lora.rank, lora.alpha, lora.targets) == (4, 16.0, 'q,v,o,down')
  theirs = _logits_hf(made)
  assert np.abs(theirs - _logits_hf(model)).max() > 0.05
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_an_adapter_for_another_base_is_refused(base, tmp_path):
  model, _, ckpt = base
  wider = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2))
  peft.get_peft_model(wider, peft.LoraConfig(r=4, target_modules=['q_proj'])).save_pretrained(
      tmp_path / 'other')
  with pytest.raises(ValueError, match=r'q_proj.lora_A.weight has shape \(4, 128\), but the base model '
                                       r'--base .* needs \(4, 64\) .*made for another base model'):
    convert.import_peft(str(tmp_path / 'other'), ckpt, str(tmp_path / 'out'), log=None)
  assert not os.path.exists(tmp_path / 'out' / 'checkpoints' / '0')  # nothing half-written
  del model

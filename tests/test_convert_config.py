"""model.convert's parts that need neither torch nor transformers, so that they run on every set
(tests/test_convert.py, which compares with transformers, is skipped where torch is not installed):
config.json <-> ModelConfig on published configs and their presets, the errors naming config.json
keys, export, and `check` saying what is missing where transformers is."""

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import ModelConfig, Transformer, convert
from model.weights import hf as hf_lib
from model.weights import params as params_lib

pytestmark = pytest.mark.unit

# A tiny config.json's shape fields (tests/test_convert.py builds its models with the same).
COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5)


def test_config_mapping_and_presets():
  # A Llama-3.1-8B config.json as published (transformers<5 keys): the llama3_1_8b preset.
  llama31 = dict(architectures=['LlamaForCausalLM'], vocab_size=128256, hidden_size=4096,
                 intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                 max_position_embeddings=131072, tie_word_embeddings=False, torch_dtype='bfloat16',
                 rope_scaling=dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0,
                                   high_freq_factor=4.0, original_max_position_embeddings=8192))
  cfg, arch, notes = hf_lib.config_from_hf(llama31)
  assert (arch, notes, cfg.param_dtype) == ('llama', [], 'bfloat16')
  assert hf_lib.matching_preset(cfg) == ('llama3_1_8b', '')
  # The same through the transformers>=5 spelling.
  v5 = {k: v for k, v in llama31.items() if k not in ('rope_theta', 'rope_scaling')}
  v5['rope_parameters'] = {**llama31['rope_scaling'], 'rope_theta': 500000.0}
  assert hf_lib.config_from_hf(v5)[0] == cfg
  # Round trip through our config.json.
  assert hf_lib.config_from_hf(hf_lib.config_to_hf(cfg, 'llama', 'bfloat16'))[0] == cfg
  # Mistral-7B-v0.1: a 4096 sliding window caps the sequence length where full attention is exact.
  mistral = dict(llama31, architectures=['MistralForCausalLM'], vocab_size=32000, rope_theta=10000.0,
                 rope_scaling=None, max_position_embeddings=32768, sliding_window=4096)
  cfg, arch, notes = hf_lib.config_from_hf(mistral)
  assert arch == 'mistral' and cfg.max_seq_len == 4096 and 'sliding_window=4096' in notes[0]
  name, diff = hf_lib.matching_preset(cfg)
  assert name is None and 'rope_theta (10000.0 vs 1000000.0)' in diff
  assert hf_lib.matching_preset(hf_lib.config_from_hf(
      dict(mistral, rope_theta=1e6, sliding_window=None))[0])[0] == 'mistral_7b'
  # Llama-3.2-3B and -1B as published: tied embeddings, rope scaling by 32.
  llama32 = dict(llama31, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                 num_attention_heads=24, head_dim=128, tie_word_embeddings=True,
                 rope_scaling=dict(llama31['rope_scaling'], factor=32.0))
  assert hf_lib.matching_preset(hf_lib.config_from_hf(llama32)[0]) == ('llama3_2_3b', '')
  llama32_1b = dict(llama32, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, head_dim=64)
  assert hf_lib.matching_preset(hf_lib.config_from_hf(llama32_1b)[0]) == ('llama3_2_1b', '')
  # Qwen3-8B and Qwen3-0.6B as published; their config.json and ours say the same.
  qwen3 = dict(architectures=['Qwen3ForCausalLM'], model_type='qwen3', vocab_size=151936,
               hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
               max_position_embeddings=40960, attention_bias=False, use_sliding_window=False,
               sliding_window=None, max_window_layers=36, tie_word_embeddings=False,
               torch_dtype='bfloat16')
  cfg, arch, notes = hf_lib.config_from_hf(qwen3)
  assert (arch, notes, cfg.qk_norm, cfg.qkv_bias) == ('qwen3', [], True, False)
  assert hf_lib.matching_preset(cfg) == ('qwen3_8b', '')
  assert hf_lib.config_from_hf(hf_lib.config_to_hf(cfg, 'qwen3', 'bfloat16'))[0] == cfg
  qwen3_small = dict(qwen3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                     num_attention_heads=16, max_window_layers=28, tie_word_embeddings=True)
  assert hf_lib.matching_preset(hf_lib.config_from_hf(qwen3_small)[0]) == ('qwen3_0_6b', '')
  # Only qwen3 writes q/k norms, and qwen3 needs them.
  with pytest.raises(ValueError, match='cannot represent this model.*use --arch qwen3'):
    hf_lib.config_to_hf(cfg, 'llama', 'bfloat16')


@pytest.mark.parametrize('change,message', [
    (dict(rope_scaling=dict(rope_type='yarn', factor=4.0)), r'rope_scaling.rope_type=.yarn'),
    (dict(rope_parameters=dict(rope_type='linear', factor=2.0)), r'rope_parameters.rope_type=.linear'),
    (dict(attention_bias=True), 'attention_bias=True'),
    (dict(hidden_act='gelu'), "hidden_act='gelu'"),
    (dict(architectures=['GPT2LMHeadModel'], model_type='gpt2'), 'only .* supported'),
])
def test_unsupported_configs_name_the_key(change, message):
  hf = {**COMMON, 'architectures': ['LlamaForCausalLM'], **change}
  with pytest.raises(ValueError, match=message):
    hf_lib.config_from_hf(hf)


CHECKED = ModelConfig(vocab_size=256, embed_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=24,
                      mlp_dim=128, max_seq_len=128, qk_norm=True, tie_embeddings=True)


def test_check_without_transformers_runs_ours_and_names_what_is_missing(tmp_path, monkeypatch):
  params = nn.meta.unbox(jax.jit(Transformer(CHECKED).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
                         ['params'])
  params_lib.save_params(str(tmp_path / 'ckpt' / 'checkpoints'), CHECKED, jax.tree.map(np.asarray, params))
  config = convert.export_hf(str(tmp_path / 'ckpt'), str(tmp_path / 'hf'), dtype='float32', log=None)
  assert config['architectures'] == ['Qwen3ForCausalLM']
  # A None entry in sys.modules makes the import fail, as where the package is not installed.
  monkeypatch.setitem(sys.modules, 'torch', None)
  monkeypatch.setitem(sys.modules, 'transformers', None)
  lines = []
  with pytest.raises(convert.ReferenceUnavailable, match=r'needs torch and transformers \(pip install'):
    convert.check(str(tmp_path / 'hf'), [[1, 2, 3, 4], [5, 6]], log=lines.append)
  assert lines[0].startswith('NOTE: there is no reference to compare with')
  assert any(line.startswith('Our logits are finite; next token after each prompt: ') for line in lines)

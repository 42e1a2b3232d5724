"""Hugging Face import/export against `transformers` itself: tiny random Llama 3.1 (GQA, rope scaling),
Llama 3.2 (tied embeddings, rope scaling by 32), Mistral (GQA, sharded safetensors), Qwen2 (q/k/v
bias, tied embeddings) and Qwen3 (q/k norms, head_dim independent of the width, tied embeddings)
models are built with torch, saved, imported, compared logit for logit and token for token, exported
and reloaded; `python -m model.convert check` passes a conversion and fails a broken one.

Needs torch and transformers (requirements-test.txt); skipped where they are not installed (the
newest-releases CI run on Python 3.12, for which PyPI has no CPU build of torch)."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='torch is not installed (the newest-releases CI set has no '
                            'CPU build of it on PyPI): no transformers reference to compare with')
transformers = pytest.importorskip('transformers', reason='transformers is not installed')

from data import chat
from model import Transformer, convert
from model.inference.sampler import Generator, SamplingConfig
from model.weights import hf as hf_lib
from model.weights import params as params_lib
from tests.cli import run_cli

pytestmark = [pytest.mark.parity, pytest.mark.e2e]

VOCAB = 160
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5)
LLAMA3_ROPE = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
               'original_max_position_embeddings': 32}
ARCHS = {
    'llama': (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)),
    # Llama 3.2 1B/3B's settings: tied embeddings, rope scaling by 32.
    'llama3_2': (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                 dict(rope_theta=500000.0, rope_scaling={**LLAMA3_ROPE, 'factor': 32.0},
                      tie_word_embeddings=True)),
    'mistral': (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(rope_theta=1e6, sliding_window=None)),
    'qwen2': (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    # 4 heads of 24: 96 query features from a 64-wide stream, as Qwen3-0.6B has 16 x 128 from 1024.
    'qwen3': (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(head_dim=24, rope_theta=1e6, tie_word_embeddings=True)),
}
TIED = ('llama3_2', 'qwen2', 'qwen3')
ROPE_FACTOR = {'llama': 8.0, 'llama3_2': 32.0}
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 40))
CHAT = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'What is a tuple?'},
        {'role': 'assistant', 'content': 'An immutable sequence.'}]


def _hf_model(arch):
  config_cls, model_cls, extra = ARCHS[arch]
  model = model_cls(config_cls(**COMMON, **extra))
  # Random weights everywhere (HF initialises biases to zero and norms to one, which would hide a
  # wrongly mapped bias or norm), large enough that greedy decoding has clear winners.
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(1 + 0.1 * torch.randn_like(p) if 'norm' in name else 0.1 * torch.randn_like(p))
  return model.eval()


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def _load(ckpt, **overrides):
  cfg = dataclasses.replace(params_lib.load_model_config(ckpt), dtype='float32', **overrides)
  return cfg, params_lib.load_params(ckpt, params_lib.abstract_params_on(cfg))


@pytest.fixture(scope='module', params=sorted(ARCHS))
def imported(request, tmp_path_factory):
  """(arch, HF model, HF folder, imported checkpoint, ModelConfig, params) per architecture."""
  arch = request.param
  root = tmp_path_factory.mktemp(arch)
  model = _hf_model(arch)
  # Mistral is saved in shards, to exercise model.safetensors.index.json.
  model.save_pretrained(root / 'hf', max_shard_size='100KB' if arch == 'mistral' else '5GB')
  ckpt = str(root / 'ckpt')
  proc = run_cli('model.convert', 'import', '--hf-dir', root / 'hf', '--out', ckpt, '--dtype', 'float32')
  assert proc.returncode == 0, proc.stderr[-3000:]
  cfg, params = _load(ckpt)
  return arch, model, root / 'hf', ckpt, cfg, params


def test_import_derives_the_config(imported):
  arch, _, hf_dir, _, cfg, params = imported
  head_dim = 24 if arch == 'qwen3' else 16
  assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.embed_dim) == (4, 2, head_dim, 64)
  assert cfg.qkv_bias == (arch == 'qwen2') and cfg.qk_norm == (arch == 'qwen3')
  assert ('q_norm' in params['layers']['attn']) == cfg.qk_norm
  assert cfg.tie_embeddings == (arch in TIED)
  assert ('unembed' in params) != cfg.tie_embeddings
  assert cfg.rope_scaling_factor == ROPE_FACTOR.get(arch, 0.0)
  assert cfg.rope_original_max_len == (32 if arch in ROPE_FACTOR else 8192)
  assert cfg.rope_theta == {'qwen2': 10000.0, 'mistral': 1e6, 'qwen3': 1e6}.get(arch, 500000.0)
  if arch == 'mistral':
    assert os.path.exists(hf_dir / 'model.safetensors.index.json')


def test_imported_logits_match_transformers(imported):
  arch, model, _, _, cfg, params = imported
  ours = np.asarray(jax.jit(Transformer(cfg).apply)({'params': params}, TOKENS))
  diff = np.abs(ours - _hf_logits(model, TOKENS)).max()
  print(f'{arch}: max |logits - transformers| = {diff:.2e}')
  assert diff < 1e-4


def test_greedy_generation_matches_transformers(imported):
  """20 greedy tokens for a batch of prompts of different lengths (left-padded together on our side)
  equal transformers' generate, one prompt at a time."""
  arch, model, _, _, cfg, params = imported
  prompts = [[3, 17, 42, 9, 100, 5, 77], [8, 1, 150], list(range(20, 40))]
  stop = VOCAB - 1
  ours = Generator(cfg, params).generate(prompts, SamplingConfig(max_new_tokens=20), [stop])
  for prompt, mine in zip(prompts, ours):
    with torch.no_grad():
      out = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                           eos_token_id=stop, pad_token_id=stop)[0, len(prompt):].tolist()
    theirs = out[:out.index(stop)] if stop in out else out
    assert mine == theirs, arch
  assert sum(len(o) for o in ours) > 40  # most rows ran the full 20 steps: the comparison is real


def test_export_reloads_in_transformers(imported, tmp_path):
  arch, model, _, ckpt, cfg, _ = imported
  out = tmp_path / 'hf'
  args = ['export', '--ckpt', ckpt, '--out', str(out), '--dtype', 'float32']
  if arch == 'mistral':
    args += ['--arch', 'mistral', '--shard-size-gb', str(100e3 / 2**30)]
  proc = run_cli('model.convert', *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(reloaded) is type(model)
  theirs, mine = model.state_dict(), reloaded.state_dict()
  assert sorted(theirs) == sorted(mine)
  for name, value in theirs.items():
    assert torch.equal(value, mine[name]), name
  np.testing.assert_array_equal(_hf_logits(reloaded, TOKENS), _hf_logits(model, TOKENS))
  hf = json.loads((out / 'config.json').read_text())
  assert hf['tie_word_embeddings'] == cfg.tie_embeddings
  assert (hf['rope_scaling'] or {}).get('factor') == ROPE_FACTOR.get(arch)
  if arch == 'mistral':
    assert len(json.loads((out / 'model.safetensors.index.json').read_text())['weight_map']) == len(mine)


def test_export_import_round_trip_is_exact_in_bfloat16(imported, tmp_path):
  """bfloat16 export, re-import: every parameter comes back as the bfloat16 rounding of the original,
  also through the unscanned (layers_0, layers_1) layout."""
  arch, _, _, ckpt, cfg, params = imported
  convert.export_hf(ckpt, str(tmp_path / 'hf'), dtype='bfloat16', log=None)
  convert.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'ckpt'), log=None, scan_layers=False)
  cfg2 = params_lib.load_model_config(str(tmp_path / 'ckpt'))
  assert cfg2.param_dtype == 'bfloat16' and not cfg2.scan_layers
  assert cfg2.tie_embeddings == cfg.tie_embeddings and cfg2.qkv_bias == cfg.qkv_bias
  assert cfg2.qk_norm == cfg.qk_norm
  _, back = _load(str(tmp_path / 'ckpt'), param_dtype='float32')
  layers = [back.pop(f'layers_{i}') for i in range(cfg.n_layers)]
  back['layers'] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
  expected = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16).astype(np.float32), params)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, back), expected)


def test_import_rejects_mismatched_weights_and_tokenizers(tmp_path):
  hf_dir = tmp_path / 'hf'
  _hf_model('llama').save_pretrained(hf_dir)
  # config.json saying something the weights do not: named tensor and shapes.
  bad = tmp_path / 'bad'
  bad.mkdir()
  for f in hf_dir.iterdir():
    (bad / f.name).write_bytes(f.read_bytes())
  config = json.loads((bad / 'config.json').read_text())
  (bad / 'config.json').write_text(json.dumps(dict(config, intermediate_size=128)))
  with pytest.raises(ValueError, match=r'mlp\.\w+_proj\.weight has shape .* config.json implies'):
    convert.import_hf(str(bad), str(tmp_path / 'x'), log=None)
  (bad / 'config.json').write_text(json.dumps(dict(config, tie_word_embeddings=True)))
  with pytest.raises(ValueError, match='tie_word_embeddings=true, but lm_head.weight differs'):
    convert.import_hf(str(bad), str(tmp_path / 'y'), log=None)
  # A tokenizer with more ids than the model has embeddings.
  from tests.tokenizers_for_tests import make_hf_tokenizer  # pylint: disable=import-outside-toplevel
  tok_dir = make_hf_tokenizer(tmp_path / 'tok', vocab_size=300)
  with pytest.raises(ValueError, match='has 300 tokens but the model.s vocabulary is only 160'):
    convert.import_hf(str(hf_dir), str(tmp_path / 'z'), tokenizer=str(tok_dir), log=None)


def test_export_of_our_own_model_with_tokenizer_and_chat_template(tmp_path):
  """What users export after training: our parameters (our init), a tokenizer.json and the template they
  tuned with. transformers computes our logits, its tokenizer gives our ids, and generation stops at
  the template's end of turn."""
  from data.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
  from model import ModelConfig  # pylint: disable=import-outside-toplevel
  from tests.tokenizers_for_tests import make_hf_tokenizer  # pylint: disable=import-outside-toplevel
  cfg = ModelConfig(vocab_size=512, embed_dim=64, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=32,
                    mlp_dim=128, dtype='float32', max_seq_len=256, init_std=0.1, rope_theta=500000.0,
                    rope_scaling_factor=4.0, rope_original_max_len=64, scan_layers=False)
  params = nn.meta.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))
                         ['params'])
  params_lib.save_params(str(tmp_path / 'ckpt' / 'checkpoints'), cfg, jax.tree.map(np.asarray, params))
  tok_dir = make_hf_tokenizer(tmp_path / 'tok', vocab_size=400)
  proc = run_cli('model.convert', 'export', '--ckpt', tmp_path / 'ckpt', '--out', tmp_path / 'hf',
                 '--dtype', 'float32', '--tokenizer', tok_dir, '--chat-template', 'llama3')
  assert proc.returncode == 0, proc.stderr[-3000:]
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'hf').eval()
  tokens = np.random.default_rng(1).integers(0, 400, (2, 48))
  ours = np.asarray(jax.jit(Transformer(cfg).apply)({'params': params}, tokens))
  assert np.abs(_hf_logits(model, tokens) - ours).max() < 1e-4
  tok = load_tokenizer(tok_dir)
  hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / 'hf')
  text = 'The for statement iterates over a sequence.'
  assert hf_tok(text).input_ids == [tok.bos_id] + tok.encode(text)
  generation = json.loads((tmp_path / 'hf' / 'generation_config.json').read_text())
  assert generation['eos_token_id'] == [tok.token_id('<|eot_id|>'), tok.eos_id]
  # The template is in tokenizer_config.json: transformers renders and tokenizes what we trained on.
  template = chat.load_template('llama3', tok)
  assert hf_tok.apply_chat_template(CHAT, return_dict=False) == template.examples(CHAT)[0].ids
  assert hf_tok.apply_chat_template(CHAT[:2], add_generation_prompt=True,
                                    return_dict=False) == template.prompt_ids(CHAT[:2])


def test_exported_sentencepiece_tokenizer_and_template_tokenize_as_ours(tmp_path):
  """A SentencePiece model without a tokenizer_config.json (as data.tokenizer trains them): export
  writes one, with the LlamaTokenizer settings under which transformers tokenizes our renderings."""
  from data.tokenizer import train_sentencepiece  # pylint: disable=import-outside-toplevel
  from tests.tokenizers_for_tests import corpus  # pylint: disable=import-outside-toplevel
  tok = train_sentencepiece(corpus(), str(tmp_path / 'sp' / 'tokenizer.model'), vocab_size=400)
  out = tmp_path / 'hf'
  out.mkdir()
  convert._copy_tokenizer(tok.path, str(out), hf_lib.silent)  # pylint: disable=protected-access
  template = chat.load_template('llama2', tok, variables={'date_string': '01 Jan 2025'})
  convert.write_chat_template(str(out), template, hf_lib.silent)
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert type(hf_tok).__name__ == 'LlamaTokenizer'
  assert hf_tok.apply_chat_template(CHAT, return_dict=False) == template.examples(CHAT)[0].ids
  assert hf_tok.apply_chat_template(CHAT[:2], add_generation_prompt=True,
                                    return_dict=False) == template.prompt_ids(CHAT[:2])


def test_check_command_passes_a_conversion_and_fails_a_broken_one(tmp_path):
  """`python -m model.convert check`: per-position logit differences, KL divergence and top-1
  agreement against transformers; status 0 within the tolerances, 1 past them."""
  hf_dir = tmp_path / 'hf'
  _hf_model('qwen3').save_pretrained(hf_dir)
  proc = run_cli('model.convert', 'check', '--hf-dir', hf_dir)  # imported in memory
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert 'no tokenizer' in out and 'computed in float32 on cpu' in out  # the CPU default
  assert out.count('same') == 7 + 16 + 25 and 'DIFFERENT' not in out  # a row per position
  assert 'top-1 agreement 48/48 positions (100.0%): PASS' in out
  # A conversion that got one weight wrong (the final norm's scale, doubled) is caught.
  convert.import_hf(str(hf_dir), str(tmp_path / 'ckpt'), 'float32', log=None)
  cfg, params = _load(str(tmp_path / 'ckpt'))
  params = jax.tree.map(np.asarray, params)
  params['final_norm']['scale'] = 2 * params['final_norm']['scale']
  params_lib.save_params(str(tmp_path / 'broken' / 'checkpoints'), cfg, params)
  proc = run_cli('model.convert', 'check', '--hf-dir', hf_dir, '--ckpt', tmp_path / 'broken',
                 '--dtype', 'bfloat16')
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'computed in bfloat16' in proc.stdout and proc.stdout.rstrip().endswith('FAIL')
  # A checkpoint of another architecture is named as such (before any weight is read).
  other = tmp_path / 'other' / 'checkpoints'
  params_lib.save_params(str(other), dataclasses.replace(cfg, qk_norm=False), params)
  with pytest.raises(ValueError, match=r'is not a conversion of .*\n  qk_norm: checkpoint False'):
    convert.check(str(hf_dir), [[1, 2, 3]], ckpt=str(other), log=hf_lib.silent)

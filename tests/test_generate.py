"""Generation: KV-cache decoding equals full recomputation, sampling filters, stopping, sharded runs, and
the `python -m model.generate` CLI with both tokenizer kinds."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import Transformer
from model import sharding
from model.inference.sampler import Generator, SamplingConfig, left_pad, sample_logits
from tests.builders import micro_model_config
from tests.cli import run_cli
from tests.tokenizers_for_tests import make_hf_tokenizer, make_sp_tokenizer
from train import checkpoint

pytestmark = pytest.mark.unit

CFG = micro_model_config(init_std=0.1, rope_theta=500000.0)
PROMPTS = [[1, 5, 7, 9, 11], [1, 3], list(range(1, 20))]
UNUSED = CFG.vocab_size - 1  # a stop id that greedy decoding of this model does not produce


@pytest.fixture(scope='module')
def params():
  return nn.meta.unbox(jax.jit(Transformer(CFG).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
                       ['params'])


@pytest.fixture(scope='module')
def greedy(params):
  return Generator(CFG, params).generate(PROMPTS, SamplingConfig(max_new_tokens=16), [UNUSED])


def test_kv_cache_decoding_equals_full_recomputation(params, greedy):
  """Every decoding step of a left-padded batch (one position each, from the cache) gives the logits
  that a full pass over that row's whole sequence gives, and greedy picks their argmax."""
  steps = 16
  tokens, segments, positions = left_pad(PROMPTS, pad_id=0)
  decode_model = Transformer(CFG, decode=True)
  cache = Generator(CFG, params)._cache(len(PROMPTS), tokens.shape[1] + steps)  # pylint: disable=protected-access
  step = jax.jit(lambda cache, t, s, p: decode_model.apply({'params': params, 'cache': cache}, t, s, p,
                                                           mutable=['cache']))
  logits, variables = step(cache, tokens, segments, positions)
  decoded = [np.asarray(logits[:, -1])]
  position = positions[:, -1] + 1
  for i in range(steps - 1):
    token = np.array([row[i] for row in greedy], np.int32)[:, None]
    logits, variables = step(variables['cache'], token, np.ones_like(token), position[:, None])
    decoded.append(np.asarray(logits[:, -1]))
    position = position + 1
  decoded = np.stack(decoded, axis=1)  # [B, steps, V]: logits predicting generated token 0, 1, ...

  full_model = jax.jit(Transformer(CFG).apply)
  for b, (prompt, out) in enumerate(zip(PROMPTS, greedy)):
    assert len(out) == steps
    # Right-padded to one length (one compilation): causal attention keeps padding out of the past.
    sequence = np.zeros((1, 48), np.int32)
    sequence[0, :len(prompt) + steps] = prompt + out
    full = np.asarray(full_model({'params': params}, sequence))[0, len(prompt) - 1:len(prompt) + steps - 1]
    np.testing.assert_allclose(decoded[b], full, atol=1e-4)
    assert out == full.argmax(-1).tolist()


def test_stops_at_the_first_stop_token_per_row(params, greedy):
  stop = greedy[0][4]
  out = Generator(CFG, params).generate(PROMPTS, SamplingConfig(max_new_tokens=16), [UNUSED, stop])
  for row, full in zip(out, greedy):
    assert row == (full[:full.index(stop)] if stop in full else full)
  assert len(out[0]) <= 4


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
  draw = lambda seed, **kw: np.asarray(sample_logits(logits, jax.random.key(seed), **kw))
  assert set(draw(0, temperature=0.0, top_k=0, top_p=1.0)) == {0}
  assert set(draw(0, temperature=1.0, top_k=2, top_p=1.0)) == {0, 1}
  assert set(draw(0, temperature=1.0, top_k=0, top_p=0.7)) == {0, 1}
  assert set(draw(0, temperature=1.0, top_k=0, top_p=0.9)) == {0, 1, 2}
  assert set(draw(0, temperature=1.0, top_k=100, top_p=0.9999999)) == {0, 1, 2, 3}  # bounds are safe
  counts = np.bincount(draw(1, temperature=1.0, top_k=0, top_p=1.0), minlength=4) / 4000
  np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)
  hot = np.bincount(draw(1, temperature=2.0, top_k=0, top_p=1.0), minlength=4) / 4000
  expected = np.array([0.5, 0.3, 0.15, 0.05]) ** 0.5
  np.testing.assert_allclose(hot, expected / expected.sum(), atol=0.03)
  np.testing.assert_array_equal(draw(3, temperature=1.0, top_k=0, top_p=1.0),
                                draw(3, temperature=1.0, top_k=0, top_p=1.0))


def test_seeded_sampling_is_reproducible(params):
  generator = Generator(CFG, params)
  sample = lambda seed: generator.generate(
      PROMPTS, SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=seed), [UNUSED])
  assert sample(0) == sample(0)
  assert sample(0) != sample(1)


@pytest.mark.parametrize('mesh_shape', [(1, 4, 2), (2, 2, 2)])
def test_sharded_generation_equals_single_device(params, greedy, mesh_shape):
  mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)))
  abstract = jax.eval_shape(lambda: Transformer(CFG).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  shardings = sharding.logical_to_sharding(nn.get_partition_spec(abstract['params']), mesh)
  sharded = jax.device_put(params, shardings)
  assert len(sharded['layers']['attn']['q_proj'].sharding.device_set) == 8
  generator = Generator(CFG, sharded, mesh, sharding.LOGICAL_AXIS_RULES)
  assert generator.generate(PROMPTS, SamplingConfig(max_new_tokens=16), [UNUSED]) == greedy


def test_too_long_is_an_error(params):
  with pytest.raises(ValueError, match='exceeds model.max_seq_len'):
    Generator(CFG, params).generate(PROMPTS, SamplingConfig(max_new_tokens=120), [UNUSED])


@pytest.fixture(scope='module')
def ckpt(params, tmp_path_factory):
  path = tmp_path_factory.mktemp('ckpt')
  saver = checkpoint.Checkpointer(str(path / 'checkpoints'), keep=1, async_save=False, model_config=CFG)
  saver.save(0, {'params': params}, None)
  saver.wait()
  return str(path)


@pytest.mark.e2e
def test_cli_with_hf_tokenizer_and_chat_template(ckpt, tmp_path):
  tok = make_hf_tokenizer(tmp_path / 'tok', vocab_size=400)
  proc = run_cli('model.generate', '--ckpt', ckpt, '--tokenizer', tok, '--chat-template', 'llama3',
                 '--prompt', 'What does a for statement do?', '--prompt', 'Hi',
                 '--max-new-tokens', '8', '--temperature', '0.7', '--top-k', '50', '--seed', '3',
                 '--mesh', '1,-1,1')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '>>> What does a for statement do?' in proc.stdout and '>>> Hi' in proc.stdout
  assert 'tokens/s (batch 2' in proc.stdout and "mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in proc.stdout
  assert 'compute float32, params float32' in proc.stdout  # the CPU default compute dtype


@pytest.mark.e2e
def test_cli_with_sentencepiece_and_vocab_check(ckpt, tmp_path):
  sp = make_sp_tokenizer(tmp_path / 'tokenizer.model', vocab_size=400)
  proc = run_cli('model.generate', '--ckpt', ckpt, '--tokenizer', sp, '--prompt', 'The for statement',
                 '--max-new-tokens', '6', '--param-dtype', 'bfloat16', '--dtype', 'bfloat16')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'tokens/s (batch 1' in proc.stdout and 'compute bfloat16, params bfloat16' in proc.stdout
  big = make_hf_tokenizer(tmp_path / 'big', vocab_size=600)
  proc = run_cli('model.generate', '--ckpt', ckpt, '--tokenizer', big, '--prompt', 'x')
  assert proc.returncode != 0
  assert 'has 600 tokens but the model' in proc.stderr

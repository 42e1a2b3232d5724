"""The decoder: published sizes, causality, packed-segment isolation, scan/remat equivalence, rope."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import ModelConfig, Transformer, count_params, preset
from model.transformer import _embed, _token_einsum, _unembed, rope_inverse_frequencies
from tests.builders import MICRO

pytestmark = pytest.mark.unit

SMALL = dict(MICRO, vocab_size=256, dtype='float32', max_seq_len=128)


class _Jitted:
  """A model whose apply is jitted (eager op-by-op dispatch is slow on CPU)."""

  def __init__(self, model):
    self.apply = jax.jit(model.apply)


def _init(cfg, seq=16):
  model = Transformer(cfg)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, seq), jnp.int32))['params']
  params = jax.tree.map(lambda x: x.value if hasattr(x, 'value') else x, params,
                        is_leaf=lambda x: hasattr(x, 'value'))
  return _Jitted(model), params


@pytest.mark.parametrize('name,expected', [
    ('llama2_7b', 6_738_415_616),
    ('llama3_8b', 8_030_261_248),
    ('mistral_7b', 7_241_732_096),
    ('llama3_2_1b', 1_235_814_400),  # tied embeddings
    ('llama3_2_3b', 3_212_749_824),  # tied embeddings
    ('qwen2_7b', 7_615_616_512),  # qkv biases
    ('qwen3_8b', 8_190_735_360),  # q/k norms
    ('qwen3_0_6b', 596_049_920),  # q/k norms, tied embeddings, 2048 query features from width 1024
])
def test_published_parameter_counts(name, expected):
  assert count_params(preset(name)) == expected
  assert count_params(preset(name, scan_layers=False)) == expected


def test_config_rejects_bad_values():
  with pytest.raises(ValueError, match='n_heads .* multiple of model.n_kv_heads'):
    ModelConfig(**{**SMALL, 'n_kv_heads': 3})
  with pytest.raises(ValueError, match='Unknown model config key'):
    ModelConfig.from_dict({**SMALL, 'n_layer': 2})
  with pytest.raises(ValueError, match='remat_policy'):
    ModelConfig(**{**SMALL, 'remat_policy': 'some'})


def test_causality():
  model, params = _init(ModelConfig(**SMALL))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
  changed = tokens.at[:, 10].set((tokens[:, 10] + 7) % 256)
  a = model.apply({'params': params}, tokens)
  b = model.apply({'params': params}, changed)
  np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-6)
  assert np.abs(a[:, 10:] - b[:, 10:]).max() > 1e-3  # the change is visible from position 10 on


def test_packed_segments_do_not_see_each_other():
  model, params = _init(ModelConfig(**SMALL))
  rng = np.random.default_rng(0)
  first, second = rng.integers(0, 256, 9), rng.integers(0, 256, 7)
  packed = np.concatenate([first, second])[None]
  segment_ids = np.array([[1] * 9 + [2] * 7])
  positions = np.array([list(range(9)) + list(range(7))])
  out = model.apply({'params': params}, packed, segment_ids, positions)
  alone_first = model.apply({'params': params}, first[None])
  alone_second = model.apply({'params': params}, second[None])
  np.testing.assert_allclose(out[0, :9], alone_first[0], atol=1e-5)
  np.testing.assert_allclose(out[0, 9:], alone_second[0], atol=1e-5)
  # Without segment ids the second document would see the first: the test can tell the difference.
  unmasked = model.apply({'params': params}, packed, np.ones_like(segment_ids), positions)
  assert np.abs(unmasked[0, 9:] - alone_second[0]).max() > 1e-3


def test_scan_and_unrolled_layers_agree():
  cfg = ModelConfig(**SMALL)
  scanned, params = _init(cfg)
  unrolled = _Jitted(Transformer(ModelConfig(**{**SMALL, 'scan_layers': False})))
  layer_params = {f'layers_{i}': jax.tree.map(lambda x, i=i: x[i], params['layers'])
                  for i in range(cfg.n_layers)}
  unrolled_params = {**{k: v for k, v in params.items() if k != 'layers'}, **layer_params}
  tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 256)
  np.testing.assert_allclose(scanned.apply({'params': params}, tokens),
                             unrolled.apply({'params': unrolled_params}, tokens), atol=1e-5)


def test_remat_policies_keep_gradients():
  tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, 256)
  _, params = _init(ModelConfig(**SMALL))

  def grads(policy):
    model = Transformer(ModelConfig(**{**SMALL, 'remat_policy': policy}))
    loss = lambda p: jnp.mean(model.apply({'params': p}, tokens) ** 2)
    return jax.jit(jax.grad(loss))(params)

  base = grads('none')
  for policy in ('save_dots', 'save_attn', 'full'):
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(grads(policy))):
      np.testing.assert_allclose(a, b, atol=1e-6, err_msg=policy)


def test_tied_embeddings_and_qkv_bias_change_the_parameter_tree():
  _, tied = _init(ModelConfig(**{**SMALL, 'tie_embeddings': True, 'qkv_bias': True}))
  assert 'unembed' not in tied
  assert set(tied['layers']['attn']) == {'q_proj', 'k_proj', 'v_proj', 'o_proj',
                                         'q_bias', 'k_bias', 'v_bias'}


def test_qk_norm_normalises_each_head_before_rope():
  """Qwen3's q/k norms: one head_dim-wide scale each, shared by the heads, with head_dim apart from
  embed_dim / n_heads. Scaling one head's query projection, or every key projection, leaves the output
  unchanged: the norms undo it (without them the attention pattern would sharpen)."""
  cfg = ModelConfig(**{**SMALL, 'head_dim': 24, 'qk_norm': True})
  model, params = _init(cfg)
  attn = params['layers']['attn']
  assert attn['q_norm']['scale'].shape == attn['k_norm']['scale'].shape == (cfg.n_layers, 24)
  assert attn['q_proj'].shape == (cfg.n_layers, 64, 4, 24)
  tokens = jax.random.randint(jax.random.key(4), (2, 16), 0, 256)
  base = model.apply({'params': params}, tokens)
  scaled_attn = {**attn, 'q_proj': attn['q_proj'].at[:, :, 1].multiply(5.0), 'k_proj': attn['k_proj'] * 3}
  scaled = {**params, 'layers': {**params['layers'], 'attn': scaled_attn}}
  np.testing.assert_allclose(model.apply({'params': scaled}, tokens), base, atol=1e-4)


def test_llama3_rope_scaling():
  base = rope_inverse_frequencies(preset('llama3_8b'))
  scaled = rope_inverse_frequencies(preset('llama3_1_8b'))
  wavelen = 2 * np.pi / base
  high = wavelen < 8192 / 4   # short wavelengths: unchanged
  low = wavelen > 8192 / 1    # long wavelengths: slowed down by the factor
  mid = ~high & ~low
  assert high.any() and low.any() and mid.any()
  np.testing.assert_allclose(scaled[high], base[high], rtol=1e-6)
  np.testing.assert_allclose(scaled[low], base[low] / 8, rtol=1e-6)
  assert np.all(scaled[mid] < base[mid]) and np.all(scaled[mid] > base[mid] / 8)


def test_token_einsum_and_unembedding_match_plain_einsums_and_autodiff():
  """The projections' merged token axis (`_token_einsum`) and the unembedding's hand-written backward
  pass compute what the plain [B, T, ...] einsums and autodiff compute, gradients included."""
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (2, 5, 8), jnp.float32)
  w = jax.random.normal(keys[1], (8, 3, 4), jnp.float32)
  ours = lambda x, w: _token_einsum('XD,DNH->XNH', x, w)
  plain = lambda x, w: jnp.einsum('BTD,DNH->BTNH', x, w)
  np.testing.assert_allclose(ours(x, w), plain(x, w), rtol=1e-6, atol=1e-6)
  g = jax.random.normal(keys[2], (2, 5, 3, 4), jnp.float32)
  vjp = lambda f: jax.vjp(f, x, w)[1](g)
  for a, b in zip(vjp(ours), vjp(plain)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

  v = jax.random.normal(keys[3], (8, 16), jnp.float32)
  loss = lambda f: lambda x, v: jnp.sum(jnp.sin(f(x, v)))
  grads = jax.grad(loss(_unembed), argnums=(0, 1))(x, v)
  expected = jax.grad(loss(lambda x, v: jnp.einsum('BTD,DV->BTV', x, v)), argnums=(0, 1))(x, v)
  assert grads[0].shape == x.shape and grads[1].shape == v.shape
  for a, b in zip(grads, expected):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_embedding_gradient_matches_autodiff_and_sums_in_float32():
  """The embedding's hand-written backward pass: a scatter-add of the rows' gradients, repeated tokens
  included, summed in float32 even for bfloat16 compute."""
  table = jax.random.normal(jax.random.key(0), (64, 8), jnp.float32)
  tokens = jnp.array([[1, 1, 1, 5], [5, 2, 63, 1]])
  g = jax.random.normal(jax.random.key(1), (2, 4, 8), jnp.float32)

  def ours(dtype):
    return jax.jit(jax.grad(lambda t: jnp.sum(_embed(t, tokens, dtype).astype(jnp.float32) * g)))(table)

  def autodiff(dtype):
    return jax.jit(jax.grad(
        lambda t: jnp.sum(jnp.take(t.astype(dtype), tokens, axis=0).astype(jnp.float32) * g)))(table)

  np.testing.assert_allclose(ours(jnp.float32), autodiff(jnp.float32), rtol=1e-6, atol=1e-6)
  assert float(jnp.abs(ours(jnp.float32)[1]).sum()) > 0 and float(jnp.abs(ours(jnp.float32)[0]).sum()) == 0
  # bfloat16 compute: each contribution is rounded to bfloat16 once, then summed in float32.
  rounded = g.astype(jnp.bfloat16).astype(jnp.float32)
  exact = jnp.zeros(table.shape, jnp.float32).at[tokens].add(rounded)
  np.testing.assert_allclose(ours(jnp.bfloat16), exact, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ours(jnp.bfloat16), autodiff(jnp.bfloat16), rtol=2e-2, atol=2e-2)

"""Every attention implementation against the reference, with packing, padding and grouped heads:
outputs and gradients (splash runs in Pallas interpret mode; cudnn through JAX's XLA path on CPU)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import ModelConfig, Transformer
from model import attention as attention_lib
from model import sharding
from tests.builders import MICRO

pytestmark = pytest.mark.unit

B, T, N, K, H = 2, 256, 4, 2, 32


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32)
             for shape in ((B, T, N, H), (B, T, K, H), (B, T, K, H)))
  # Row 0: three packed documents, then padding (segment 0). Row 1: two documents, no padding.
  segments = np.ones((B, T), np.int32)
  segments[0, 70:] = 2
  segments[0, 150:] = 3
  segments[0, 230:] = 0
  segments[1, 129:] = 2
  return q, k, v, jnp.asarray(segments)


def _loss_and_grads(fn, q, k, v, segments):
  weights = jnp.sin(jnp.arange(B * T * N * H, dtype=jnp.float32)).reshape(B, T, N, H)

  def loss(q, k, v):
    return jnp.sum(fn(q, k, v, segments, segments) * weights)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


IMPLS = {
    'chunked_64': functools.partial(attention_lib.chunked_attention, chunk=64),
    'chunked_uneven': functools.partial(attention_lib.chunked_attention, chunk=100),
    'chunked_capped': functools.partial(attention_lib.chunked_attention, chunk=8),  # 32 -> 16 chunks
    'splash': functools.partial(attention_lib.splash_attention, interpret=True),
    'cudnn_api_xla': functools.partial(attention_lib.cudnn_attention, implementation='xla'),
    'cudnn_api_default': functools.partial(attention_lib.cudnn_attention, implementation=None),
}


@pytest.mark.parametrize('name', list(IMPLS))
def test_matches_reference(name, monkeypatch):
  monkeypatch.setattr(attention_lib, 'SPLASH_BLOCK', 128)  # two blocks per axis: exercises skipping
  q, k, v, segments = _inputs()
  ref_loss, ref_grads = _loss_and_grads(attention_lib.xla_attention, q, k, v, segments)
  loss, grads = _loss_and_grads(IMPLS[name], q, k, v, segments)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for label, a, b in zip('qkv', ref_grads, grads):
    np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-4, err_msg=f'd{label}')


def test_chunk_count_is_capped():
  assert len(attention_lib._chunks(T, 64)) == 4  # pylint: disable=protected-access
  capped = attention_lib._chunks(T, 8)  # pylint: disable=protected-access
  assert len(capped) == attention_lib.MAX_CHUNKS and capped[-1][1] == T
  assert all(b - a == T // attention_lib.MAX_CHUNKS for a, b in capped)


def test_reference_honours_segments_and_causality():
  q, k, v, segments = _inputs()
  out = attention_lib.xla_attention(q, k, v, segments, segments)
  # Document 2 of row 0 alone gives the same output as inside the packed row...
  alone = attention_lib.xla_attention(q[:1, 70:150], k[:1, 70:150], v[:1, 70:150],
                                      segments[:1, 70:150], segments[:1, 70:150])
  np.testing.assert_allclose(out[:1, 70:150], alone, atol=1e-5)
  # ...and a change to a later key leaves earlier queries alone, but not later ones.
  changed = attention_lib.xla_attention(q, k.at[:, 100].add(1.0), v.at[:, 100].add(1.0), segments,
                                        segments)
  np.testing.assert_allclose(changed[:, :100], out[:, :100], atol=1e-6)
  assert np.abs(changed[0, 100:150] - out[0, 100:150]).max() > 1e-3
  np.testing.assert_allclose(changed[0, 150:], out[0, 150:], atol=1e-6)  # another document


def test_splash_under_a_sharded_mesh(monkeypatch):
  """Inside the train step's mesh, splash runs per device (shard_map over batch and heads)."""
  monkeypatch.setattr(attention_lib, 'SPLASH_BLOCK', 128)
  q, k, v, segments = _inputs()
  mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=2), jax.devices()[:4])
  splash = functools.partial(attention_lib.splash_attention, interpret=True)
  qs = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp'), None, 'tensor'))
  ss = sharding.batch_sharding(mesh)
  fn = jax.jit(sharding.with_logical_rules(splash, mesh), in_shardings=(qs, qs, qs, ss, ss))
  out = fn(q, k, v, segments, segments)
  np.testing.assert_allclose(out, attention_lib.xla_attention(q, k, v, segments, segments), atol=1e-5)
  assert 'shard_map' in str(jax.make_jaxpr(sharding.with_logical_rules(splash, mesh))(
      q, k, v, segments, segments))


def test_auto_picks_per_platform():
  assert attention_lib.resolve('auto', 'tpu') == 'splash'
  assert attention_lib.resolve('auto', 'gpu', jnp.bfloat16) == 'cudnn'
  assert attention_lib.resolve('auto', 'gpu', jnp.float32) == 'chunked'  # cuDNN has no float32
  assert attention_lib.resolve('auto', 'cpu') == 'chunked'
  assert attention_lib.resolve('xla', 'tpu') == 'xla'
  q, k, v, segments = _inputs()
  with pytest.raises(ValueError, match='bfloat16 or float16'):
    attention_lib.cudnn_attention(q, k, v, segments, segments)


def test_model_outputs_agree_across_implementations():
  cfg = dict(MICRO, vocab_size=256, dtype='float32', max_seq_len=128)
  tokens = jax.random.randint(jax.random.key(0), (2, 128), 0, 256)
  segments = jnp.asarray(np.repeat([[1, 2]], 64, axis=1).repeat(2, axis=0))
  positions = jnp.asarray(np.tile(np.arange(64), 2)[None].repeat(2, axis=0))
  ref = Transformer(ModelConfig(**cfg, attention='xla'))
  params = jax.jit(ref.init)(jax.random.key(1), tokens)['params']
  out = {}
  for impl in ('xla', 'chunked', 'auto'):
    model = Transformer(ModelConfig(**cfg, attention=impl))
    out[impl] = jax.jit(model.apply)({'params': params}, tokens, segments, positions)
  np.testing.assert_allclose(out['chunked'], out['xla'], atol=2e-5)
  np.testing.assert_allclose(out['auto'], out['chunked'], atol=0)

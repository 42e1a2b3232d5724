"""Chunked cross-entropy: the same sums and gradients as the plain loss, without [B, T, V] logits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from data.synthetic import synthetic_global_batch
from model import ModelConfig, Transformer
from tests.builders import MICRO
from train import optimizer, step as step_lib

pytestmark = pytest.mark.unit

BASE = dict(MICRO, vocab_size=300, dtype='float32', max_seq_len=128)


def _params(cfg):
  model = Transformer(ModelConfig(**cfg))
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  return jax.tree.map(lambda x: x.value if hasattr(x, 'value') else x, params,
                      is_leaf=lambda x: hasattr(x, 'value'))


def _sums_and_grads(cfg, chunk, params, batch):
  model = Transformer(ModelConfig(**cfg))

  def objective(p):
    sums = step_lib.loss_sums(model, p, batch, loss_chunk_len=chunk)
    return sums['ce'] + 1e-2 * sums['z'], sums

  return jax.jit(jax.grad(objective, has_aux=True))(params)


@pytest.mark.slow
@pytest.mark.parametrize('tied', [False, True])
def test_chunked_loss_equals_plain_loss(tied):
  cfg = {**BASE, 'tie_embeddings': tied}
  params = _params(cfg)
  batch = synthetic_global_batch(0, 0, 4, 96, cfg['vocab_size'])
  ref_grads, ref = _sums_and_grads(cfg, 0, params, batch)
  for chunk in (32, 7):  # 3 chunks of 32; 16 of 6
    grads, sums = _sums_and_grads(cfg, chunk, params, batch)
    for key in ('ce', 'z', 'weight'):
      np.testing.assert_allclose(sums[key], ref[key], rtol=1e-6, err_msg=key)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref_grads), jax.tree.leaves(grads)):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * np.abs(a).max(), err_msg=str(path))


def test_chunk_counts():
  assert step_lib.loss_chunks(4096, 1024) == 4
  assert step_lib.loss_chunks(4096, 0) == 1
  assert step_lib.loss_chunks(256, 1024) == 1
  assert step_lib.loss_chunks(96, 40) == 3     # chunks of 32: the fewest with length <= 40
  assert step_lib.loss_chunks(97, 40) == 97    # a prime length: one position per chunk, still exact


def test_chunked_loss_does_not_hold_the_whole_logits():
  """Compiled temporaries of loss + gradient: the [B, T, V] float32 logits (and their gradient) are
  what chunking removes."""
  cfg = {**BASE, 'vocab_size': 4096, 'n_layers': 1}
  b, t = 4, 256
  logits_bytes = b * t * cfg['vocab_size'] * 4
  batch = jax.tree.map(jnp.asarray, synthetic_global_batch(0, 0, b, t, cfg['vocab_size']))
  params = jax.eval_shape(lambda: _params(cfg))

  def temp_bytes(chunk):
    model = Transformer(ModelConfig(**{**cfg, 'max_seq_len': t}))
    grad = jax.grad(lambda p: step_lib.loss_sums(model, p, batch, loss_chunk_len=chunk)['ce'])
    return jax.jit(grad).lower(params).compile().memory_analysis().temp_size_in_bytes

  plain, chunked = temp_bytes(0), temp_bytes(64)
  assert plain > 2 * logits_bytes, (plain, logits_bytes)
  assert chunked < plain - logits_bytes, (chunked, plain, logits_bytes)


def test_bfloat16_optimizer_state():
  opt = dict(lr=1e-2, warmup_steps=0, decay_steps=0, min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
             weight_decay=0.1, grad_clip=1.0)
  params = {'w': jnp.ones((4, 4), jnp.float32), 'norm': {'scale': jnp.ones((4,), jnp.float32)}}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  tx32, _ = optimizer.make_optimizer(opt, 10)
  tx16, _ = optimizer.make_optimizer({**opt, 'state_dtype': 'bfloat16'}, 10)
  state32, state16 = tx32.init(params), tx16.init(params)
  floats = lambda s: [x for x in jax.tree.leaves(s) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert {x.dtype for x in floats(state32)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in floats(state16)} == {jnp.dtype(jnp.bfloat16)}
  for _ in range(3):
    u32, state32 = tx32.update(grads, state32, params)
    u16, state16 = tx16.update(grads, state16, params)
  assert {x.dtype for x in floats(state16)} == {jnp.dtype(jnp.bfloat16)}  # stays bf16
  for a, b in zip(jax.tree.leaves(u32), jax.tree.leaves(u16)):
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(b, a, rtol=1e-2)
  new = optax.apply_updates(params, u16)
  assert jax.tree.map(lambda x: x.dtype, new) == jax.tree.map(lambda x: x.dtype, params)

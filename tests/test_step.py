"""The sharded train step: same numbers on any mesh, accumulation = full batch, loss falls."""

import jax
import ml_collections
import numpy as np
import optax
import pytest

from configs import default
from data.synthetic import synthetic_global_batch
from model import ModelConfig, Transformer
from model import sharding
from tests.builders import micro_model_config
from train import optimizer, state as state_lib, step as step_lib, validate

pytestmark = pytest.mark.unit

MODEL = micro_model_config(vocab_size=256)
OPT = dict(lr=1e-2, warmup_steps=0, decay_steps=0, min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
           weight_decay=0.1, grad_clip=1.0)
BATCH, SEQ = 16, 32


def _mesh(shape):
  return sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)), jax.devices()[:int(np.prod(shape))])


def _batch(step=0):
  return synthetic_global_batch(0, step, BATCH, SEQ, MODEL.vocab_size)


def _loss_and_grads(mesh):
  model = Transformer(MODEL)
  tx, _ = optimizer.make_optimizer(OPT, 10)
  state = state_lib.init_state(MODEL, tx, mesh, seed=0)

  def loss_fn(params, batch):
    sums = step_lib.loss_sums(model, params, batch)
    return sums['ce'] / sums['weight']

  fn = jax.jit(sharding.with_logical_rules(jax.value_and_grad(loss_fn), mesh),
               in_shardings=(state_lib.state_shardings(MODEL, tx, mesh).params,
                             sharding.batch_sharding(mesh)))
  loss, grads = fn(state.params, _batch())
  return float(loss), jax.device_get(grads)


@pytest.mark.slow
def test_loss_and_grads_are_the_same_on_every_mesh():
  ref_loss, ref_grads = _loss_and_grads(_mesh((1, 1, 1)))
  for shape in [(8, 1, 1), (1, 8, 1), (2, 2, 2)]:
    loss, grads = _loss_and_grads(_mesh(shape))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, err_msg=str(shape))
    for path, a in jax.tree_util.tree_leaves_with_path(ref_grads):
      b = _get(grads, path)
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7, err_msg=f'{shape} {path}')


def _get(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def _train(mesh, accum, steps, tx=None):
  model = Transformer(MODEL)
  adamw, schedule = optimizer.make_optimizer(OPT, 100)
  tx = tx or adamw
  shardings = state_lib.state_shardings(MODEL, tx, mesh)
  state = state_lib.init_state(MODEL, tx, mesh, seed=0)
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(model, tx, schedule, grad_accum_steps=accum), shardings, mesh)
  history = []
  for i in range(steps):
    state, metrics = train_step(state, _batch(i % 4))
    history.append(jax.device_get(metrics))
  return jax.device_get(state.params), history


@pytest.mark.slow
def test_accumulation_equals_the_full_batch():
  # Plain SGD: the update is linear in the gradient, so parameters compare the gradients themselves
  # (Adam's near-sign first steps would magnify float rounding on near-zero gradients).
  mesh, sgd = _mesh((2, 2, 2)), optax.sgd(0.5)
  full_params, full = _train(mesh, accum=1, steps=2, tx=sgd)
  acc_params, acc = _train(mesh, accum=4, steps=2, tx=sgd)
  for key in ('loss', 'grad_norm', 'tokens'):
    np.testing.assert_allclose([m[key] for m in acc], [m[key] for m in full], rtol=1e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(full_params), jax.tree.leaves(acc_params)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  assert max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(full_params),
                                                   jax.tree.leaves(_train(mesh, 1, 0, sgd)[0]))) > 1e-3


def test_loss_falls():
  _, history = _train(_mesh((8, 1, 1)), accum=1, steps=40)
  first, last = history[0]['loss'], np.mean([m['loss'] for m in history[-4:]])
  assert last < first - 1.0, (first, last)
  assert history[0]['learning_rate'] > 0  # warmup does not waste the first step


def test_weight_decay_skips_norms_and_biases():
  params = {'layers': {'attn': {'q_proj': 0, 'q_bias': 0}, 'attn_norm': {'scale': 0}},
            'token_embed': 0}
  assert optimizer.weight_decay_mask(params) == {
      'layers': {'attn': {'q_proj': True, 'q_bias': False}, 'attn_norm': {'scale': False}},
      'token_embed': True}


def _config(**overrides) -> ml_collections.ConfigDict:
  c = default.get_config()
  c.train.batch_size, c.train.seq_len = 16, 64
  for key, value in overrides.items():
    section, name = key.split('.')
    c[section][name] = value
  return c


@pytest.mark.parametrize('overrides,message', [
    ({'mesh.data': 3}, r'do not divide the 8 devices|does not divide the 8 devices'),
    ({'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 1}, r'data\*fsdp\*tensor = 4 .* 8 devices'),
    ({'train.batch_size': 12}, r'12\) must be divisible by the 8 batch shards'),
    ({'train.grad_accum_steps': 3}, r'train.batch_size \(16\) must be divisible by train.grad_accum_steps'),
    ({'train.grad_accum_steps': 4}, r'microbatch .* = 4\) must be divisible by the 8 batch shards'),
    ({'mesh.fsdp': 1, 'mesh.tensor': -1}, r'model.n_kv_heads \(1\) must be divisible by .*mesh.tensor = 8'),
    ({'train.seq_len': 4096}, r'train.seq_len \(4096\) exceeds model.max_seq_len \(1024\)'),
])
def test_config_errors_name_the_key(overrides, message):
  cfg = _config(**overrides)
  with pytest.raises(validate.ConfigError, match=message):
    validate.check(cfg, ModelConfig.from_dict(cfg.model), num_devices=8)


def test_tokenizer_larger_than_vocab_is_an_error():
  cfg = _config()
  with pytest.raises(validate.ConfigError, match='tokenizer has 4096 tokens but model.vocab_size is 2048'):
    validate.check(cfg, ModelConfig.from_dict(cfg.model), num_devices=8, tokenizer_vocab=4096)

"""LoRA and QLoRA: adapters start as an exact no-op and only they train (the base stays bit-identical);
merged = unmerged; adapter gradients = autodiff through the merged model; the int8/NF4 round trip
within its bound; the same loss on every mesh; exact resume from a base checkpoint; generation from a
LoRA checkpoint, unmerged; bad input named by its key."""

import dataclasses
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from data.synthetic import SyntheticData, synthetic_global_batch
from model import ModelConfig, Transformer, init_params
from model import lora as lora_lib
from model import sharding
from model.inference.sampler import Generator, SamplingConfig
from model.lora import LoraConfig
from model.weights import adapters
from model.weights import params as params_lib
from tests.builders import losses as _losses, micro_model_config, run_config
from tests.cli import run_cli
from train import loop, optimizer, start as start_lib, validate
from train import run as run_lib
from train import state as state_lib
from train import step as step_lib

pytestmark = pytest.mark.unit

MODEL = micro_model_config(vocab_size=256)
LORA = LoraConfig(rank=4, alpha=8.0)
TOKENS = np.random.default_rng(0).integers(0, MODEL.vocab_size, (2, 24))


def _params(cfg=MODEL, lora=LORA, random_b=True, seed=0):
  """Unboxed parameters with adapters; B random (else zero, as initialised)."""
  params = jax.jit(lambda rng: nn.meta.unbox(init_params(cfg, rng, lora)))(jax.random.key(seed))
  if random_b:
    ad, base = lora_lib.split(params)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    ad = jax.tree.map(lambda x: 0.2 * jax.random.normal(next(keys), x.shape), ad)
    params = lora_lib.join(base, ad)
  return params


def _logits(cfg, params, lora=LoraConfig(), **kw):
  return np.asarray(jax.jit(Transformer(cfg, lora=lora, **kw).apply)({'params': params}, TOKENS))


def test_adapters_start_as_an_exact_no_op():
  # B = 0 makes every adapter term exactly zero, with scanned layers (here) or unrolled ones.
  params = _params(random_b=False)
  _, base = lora_lib.split(params)
  np.testing.assert_array_equal(_logits(MODEL, params, LORA), _logits(MODEL, base))
  a = params['layers']['attn']['q_proj_lora_a']
  bound = 1 / np.sqrt(MODEL.embed_dim)  # PEFT's A init, U(+-1/sqrt(fan_in))
  assert 0.8 * bound < float(jnp.abs(a).max()) <= bound


def test_merged_equals_unmerged_and_adapters_off_is_the_base():
  params = _params()
  unmerged = _logits(MODEL, params, LORA)
  merged = _logits(MODEL, lora_lib.merge(params, LORA))
  np.testing.assert_allclose(unmerged, merged, atol=1e-5, rtol=1e-5)
  _, base = lora_lib.split(params)
  base_logits = _logits(MODEL, base)
  assert np.abs(unmerged - base_logits).max() > 0.1  # the adapters do something
  # Adapters off: the same parameters compute the base model (DPO's reference, no second copy).
  np.testing.assert_array_equal(_logits(MODEL, params, LORA, use_adapters=False), base_logits)


def test_adapter_gradients_equal_autodiff_through_the_merged_model():
  lora = dataclasses.replace(LORA, targets='layers/attn/(q|o)_proj|.*down_proj', rslora=True)
  params = _params(lora=lora)
  ad, base = lora_lib.split(params)
  assert sorted(ad['layers']['attn']) == ['o_proj_lora_a', 'o_proj_lora_b', 'q_proj_lora_a',
                                          'q_proj_lora_b']
  targets = jnp.roll(TOKENS, -1, axis=1)

  def loss(logits):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))

  def unmerged(a):
    return loss(Transformer(MODEL, lora=lora).apply({'params': lora_lib.join(base, a)}, TOKENS))

  def merged(a):
    return loss(Transformer(MODEL).apply({'params': lora_lib.merge(lora_lib.join(base, a), lora)}, TOKENS))

  g1, g2 = jax.jit(jax.grad(unmerged))(ad), jax.jit(jax.grad(merged))(ad)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g2)):
    assert float(jnp.abs(a).max()) > 0, path
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def _nf4_reference(w, block):
  """numpy NF4 of bitsandbytes' algorithm for [in, out] weights: blocks of `block` inputs per output."""
  blocks = w.T.reshape(-1, block)
  absmax = np.abs(blocks).max(1)
  scaled = np.clip(blocks / absmax[:, None], -1, 1)
  codes = np.searchsorted((lora_lib.NF4[:-1] + lora_lib.NF4[1:]) / 2, scaled, side='left')
  return codes.reshape(w.T.shape).T, absmax.reshape(w.shape[1], -1).T


@pytest.mark.parametrize('kind', ['nf4', 'int8'])
def test_quantization_round_trip_within_its_bound(kind):
  w = np.random.default_rng(1).normal(0, 0.05, (256, 96)).astype(np.float32)
  w[3, 5] = 0.0
  codes, scale = lora_lib.quantize(jnp.asarray(w), kind, 64, -2)
  assert codes.dtype == lora_lib.QUANTIZED[kind] and scale.shape == (4, 96)
  restored = np.asarray(lora_lib.dequantize(codes, scale, kind, -2))
  err = np.abs(restored - w).reshape(4, 64, 96).max(1) / np.asarray(scale)
  assert err.max() <= lora_lib.ERROR_BOUND[kind] + 1e-6
  assert err.max() > 0.6 * lora_lib.ERROR_BOUND[kind]  # the bound is nearly reached: it is tight
  assert restored[3, 5] == 0.0
  biggest = np.abs(w[:64, 0]).argmax()
  assert restored[biggest, 0] == w[biggest, 0]  # the block's absmax itself is exact
  if kind == 'nf4':
    ref_codes, ref_scale = _nf4_reference(w, 64)
    np.testing.assert_array_equal(np.asarray(codes).astype(np.int64), ref_codes)
    np.testing.assert_array_equal(np.asarray(scale), ref_scale)


def test_quantized_bases_compute_close_to_bfloat16():
  """The same weights held in bfloat16, int8 and nf4: logits close to the bfloat16 model's."""
  _, base = lora_lib.split(_params(random_b=False))
  bf16 = dataclasses.replace(MODEL, param_dtype='bfloat16')
  reference = _logits(bf16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), base))
  errors = {}
  for kind in ('int8', 'nf4'):
    lora = dataclasses.replace(LORA, base_dtype=kind, block_size=16)
    logits = _logits(MODEL, lora_lib.quantize_params(base, lora), lora, use_adapters=False)
    errors[kind] = np.sqrt(np.mean((logits - reference) ** 2)) / reference.std()
  # Measured (RMS error over the logits' spread): int8 0.0066, nf4 0.083; bfloat16 itself differs
  # from float32 by 0.0030.
  assert errors['int8'] < 0.02 and errors['nf4'] < 0.2, errors
  assert errors['int8'] < errors['nf4'] / 5


# --------------------------------------------------------------------------------------------------
# The train step

OPT = dict(lr=1e-2, warmup_steps=0, decay_steps=0, min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
           weight_decay=0.1, grad_clip=1.0)
QLORA = dataclasses.replace(LORA, base_dtype='nf4', block_size=16, dropout=0.1)


def _mesh(shape):
  return sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)), jax.devices()[:int(np.prod(shape))])


def _batch(step=0):
  return synthetic_global_batch(0, step, 16, 32, MODEL.vocab_size)


def _state(mesh, lora, tx):
  """A state over a random base (quantized as `lora` says), adapters with random B."""
  ad, base = lora_lib.split(_params())
  return state_lib.init_state(MODEL, tx, mesh, 0, ad, lora=lora,
                              frozen=lora_lib.quantize_params(base, lora))


def _loss_and_grads(mesh, lora):
  model = Transformer(MODEL, lora=lora)
  tx, _ = optimizer.make_optimizer(OPT, 10)
  state = _state(mesh, lora, tx)
  shardings = state_lib.state_shardings(MODEL, tx, mesh, lora=lora)

  def loss_fn(params, frozen, batch):
    sums = step_lib.loss_sums(model, lora_lib.join(frozen, params), batch)
    return sums['ce'] / sums['weight']

  fn = jax.jit(sharding.with_logical_rules(jax.value_and_grad(loss_fn), mesh),
               in_shardings=(shardings.params, shardings.frozen, sharding.batch_sharding(mesh)))
  loss, grads = fn(state.params, state.frozen, _batch())
  return float(loss), jax.device_get(grads)


@pytest.mark.slow
def test_loss_and_adapter_grads_are_the_same_on_every_mesh():
  # The meshes of tests/test_step.py. (An nf4 base trains on a 2 x 2 x 2 mesh below.)
  lora = LORA
  ref_loss, ref_grads = _loss_and_grads(_mesh((1, 1, 1)), lora)
  for shape in [(8, 1, 1), (1, 8, 1), (2, 2, 2)]:
    loss, grads = _loss_and_grads(_mesh(shape), lora)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, err_msg=str(shape))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref_grads), jax.tree.leaves(grads)):
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7, err_msg=f'{shape} {path}')


def test_train_step_updates_only_the_adapters():
  mesh, lora = _mesh((2, 2, 2)), QLORA
  tx, schedule = optimizer.make_optimizer(OPT, 100)
  state = _state(mesh, lora, tx)
  before = jax.device_get((state.params, state.frozen))
  # Optimizer state exists for the adapters only: Adam's moments have exactly their tree.
  adam = state.opt_state[1][0]
  assert jax.tree.structure(adam.mu) == jax.tree.structure(state.params)
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(Transformer(MODEL, lora=lora), tx, schedule),
      state_lib.state_shardings(MODEL, tx, mesh, lora=lora), mesh)
  losses = []
  for _ in range(8):
    state, metrics = train_step(state, _batch())  # the adapters fit one batch
    losses.append(float(metrics['loss']))
  assert losses[-1] < losses[0] - 0.02, losses  # measured: 5.562 -> 5.523
  after = jax.device_get((state.params, state.frozen))
  for a, b in zip(jax.tree.leaves(before[1]), jax.tree.leaves(after[1])):
    assert a.dtype == b.dtype and np.array_equal(a, b)  # the base: bit-identical
  for path, a in jax.tree_util.tree_leaves_with_path(before[0]):
    b = after[0]
    for k in path:
      b = b[k.key]
    assert np.abs(a - b).max() > 1e-4, path  # every adapter trained


def test_a_quantized_base_is_loaded_a_layer_at_a_time(tmp_path):
  """Quantizing a checkpoint slice by slice on the device gives the whole-tree result, sharded as in
  training, with the fingerprint of the unquantized weights."""
  _, plain = lora_lib.split(_params(random_b=False))
  plain = jax.device_get(plain)
  params_lib.save_params(str(tmp_path / 'checkpoints'), MODEL, plain)
  mesh = _mesh((2, 2, 2))
  base, prints = adapters.load_base(str(tmp_path), MODEL, QLORA, mesh)
  assert prints == adapters.fingerprint(plain)
  expected = lora_lib.quantize_params(plain, QLORA)
  shardings = state_lib.state_shardings(MODEL, optax.sgd(1.0), mesh, lora=QLORA).frozen
  for (path, want), got, sharding in zip(jax.tree_util.tree_leaves_with_path(expected),
                                         jax.tree.leaves(base), jax.tree.leaves(shardings)):
    assert got.dtype == want.dtype and got.sharding == sharding, path
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(path))


# --------------------------------------------------------------------------------------------------
# Runs: a base checkpoint, LoRA continued pretraining, exact resume, generation, bad input

def _run_config(steps, **lora):
  return run_config('tiny', data=dict(format='synthetic'), train=dict(steps=steps, seq_len=32),
                    optimizer=dict(decay_steps=6, warmup_steps=2, lr=1e-2), checkpoint=dict(every_steps=3),
                    lora={**dict(rank=4, alpha=8.0, dropout=0.1), **lora})


@pytest.fixture(scope='module')
def base_ckpt(tmp_path_factory):
  """A plain checkpoint of random weights, as an imported Hugging Face model is written."""
  cfg = ModelConfig.from_dict(_run_config(1).model)
  params = jax.device_get(nn.meta.unbox(init_params(cfg, jax.random.key(3))))
  out = str(tmp_path_factory.mktemp('base') / 'checkpoints')
  params_lib.save_params(out, cfg, params)
  return os.path.dirname(out), params


def _train(workdir, base, steps, **lora):
  c = _run_config(steps, **lora)
  c.init_from = base
  return loop.train(c, workdir, SyntheticData(0, 32, c.model.vocab_size))


@pytest.fixture(scope='module')
def lora_runs(base_ckpt, tmp_path_factory):
  root = tmp_path_factory.mktemp('lora')
  straight, interrupted = str(root / 'straight'), str(root / 'interrupted')
  _train(straight, base_ckpt[0], 6)
  _train(interrupted, base_ckpt[0], 4)
  _train(interrupted, base_ckpt[0], 6)
  return straight, interrupted


@pytest.mark.slow
@pytest.mark.e2e
def test_lora_run_resumes_exactly_and_checkpoints_only_adapters(base_ckpt, lora_runs):
  straight, interrupted = lora_runs
  a, b = _losses(straight), _losses(interrupted)
  assert sorted(a) == sorted(b) == list(range(1, 7))
  np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-6)
  cfg_a, lora, params_a = adapters.load_model(straight)
  _, _, params_b = adapters.load_model(interrupted)
  assert lora.rank == 4 and lora.dropout == 0.1
  for x, y in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  # The checkpoint holds adapters and their moments, not the base; it points to the base instead.
  pointer = params_lib.load_base_pointer(straight)
  assert pointer['base'] == str(params_lib.resolve_step_dir(base_ckpt[0]))
  step_dir = params_lib.resolve_step_dir(straight)
  from orbax import checkpoint as ocp  # pylint: disable=import-outside-toplevel
  saved = ocp.PyTreeCheckpointer().metadata(step_dir / 'state').item_metadata.tree
  names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(saved['params'])]
  assert names and all('_lora_' in n for n in names)
  # ... and the base, loaded back, is bit for bit the base checkpoint.
  _, base = lora_lib.split(params_a)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(base), jax.tree.leaves(base_ckpt[1])):
    np.testing.assert_array_equal(np.asarray(x), y, err_msg=jax.tree_util.keystr(path))


@pytest.mark.e2e
def test_generation_from_a_lora_checkpoint_equals_merged_weights(lora_runs, demo_data):
  cfg, lora, params = adapters.load_model(lora_runs[0])
  prompts = [[1, 5, 9, 11], [1, 200, 3]]
  sampling = SamplingConfig(max_new_tokens=8)
  unmerged = Generator(cfg, params, lora=lora).generate(prompts, sampling, [2])
  merged = Generator(cfg, lora_lib.merge(params, lora)).generate(prompts, sampling, [2])
  assert unmerged == merged and len(unmerged[0]) > 0
  proc = run_cli('model.generate', '--ckpt', lora_runs[0], '--tokenizer', demo_data['tokenizer'],
                 '--prompt', 'The sky', '--max-new-tokens', '4')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'new tokens in' in proc.stdout


@pytest.mark.slow
@pytest.mark.e2e
def test_a_changed_base_is_refused(base_ckpt, lora_runs, tmp_path):
  # A copy of the run whose base is replaced by other weights of the same shapes.
  base_copy, run_copy = str(tmp_path / 'base'), str(tmp_path / 'run')
  shutil.copytree(base_ckpt[0], base_copy)
  _train(run_copy, base_copy, 3)
  shutil.rmtree(base_copy)
  cfg = ModelConfig.from_dict(_run_config(1).model)
  other = jax.device_get(nn.meta.unbox(init_params(cfg, jax.random.key(4))))
  params_lib.save_params(os.path.join(base_copy, 'checkpoints'), cfg, other)
  with pytest.raises(ValueError, match=r'trained on the base model at .*base/checkpoints/0, but that '
                                       r'checkpoint now holds different weights'):
    adapters.load_model(run_copy)
  with pytest.raises(ValueError, match='now holds different weights'):
    _train(run_copy, base_copy, 6)  # resuming
  with pytest.raises(validate.ConfigError, match=r'config.init_from=.* now holds different weights'):
    _train(str(tmp_path / 'next'), run_copy, 6)  # going on from its adapters


@pytest.mark.e2e
def test_bad_lora_settings_name_the_key(base_ckpt, lora_runs, tmp_path):
  run = lambda **lora: run_lib.Run(_run_config(1, **lora))
  with pytest.raises(validate.ConfigError, match=r'lora.rank=40 is larger than the dimensions of '
                                                 r'layers_0/attn/k_proj \(64 in, 32 out\)'):
    run(rank=40)
  with pytest.raises(validate.ConfigError, match=r"lora.targets='q,query' matches no projection: "
                                                 r'expected comma-separated names among q,k,v,o'):
    run(targets='q,query')
  with pytest.raises(validate.ConfigError, match=r'lora.block_size=64 does not divide the contracting '
                                                 r'dimension of layers_0/attn/o_proj \(16\)'):
    run(base_dtype='nf4')
  with pytest.raises(validate.ConfigError, match=r"lora.base_dtype must be one of .* got 'int4'"):
    run(base_dtype='int4')
  with pytest.raises(validate.ConfigError, match=r'lora.rank=4 trains adapters over a frozen base '
                                                 r'model: set config.init_from'):
    loop.train(_run_config(1), str(tmp_path / 'no_base'), SyntheticData(0, 32, 512))
  with pytest.raises(validate.ConfigError, match=r'holds adapters of other settings:\n  lora.rank: '
                                                 r'checkpoint 4, config 8'):
    _train(str(tmp_path / 'rank8'), lora_runs[0], 6, rank=8)
  full = _run_config(1)
  full.lora.rank = 0
  with pytest.raises(validate.ConfigError, match=r'holds LoRA adapters over .*, not a whole model'):
    start_lib.load_init_from(run_lib.Run(full), lora_runs[0])

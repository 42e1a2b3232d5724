"""The policy-gradient objective (train/policy_gradient.py) against TRL itself, and its own properties.

Parity with TRL 1.16.0 (requirements-test.txt's pin), its GRPOTrainer and RLOOTrainer driven directly:
on a tiny Llama made in transformers and imported into flaxlm (float32), and fixed prompts, completions
(of different lengths, some cut short) and rewards, TRL's own `_generate_and_score_completions` (the
sampler replaced by a `rollout_func` that returns the fixed completions) makes the advantages of each
reward scaling and the reference's log-probabilities; its `_compute_loss` gives the loss and metrics of
every loss type, with and without the KL term (with and without use_bias_correction_kl), token- and
sequence-level (GSPO) ratios, clip-higher (epsilon_high > epsilon), a sampling temperature, masked
truncated completions, and perturbed old log-probabilities (so that clipping bites on both sides); and
torch's gradients of that loss. flaxlm's per-token log-probabilities and entropies, advantages, losses,
metrics and one SGD step of the shared train step equal them to 1e-5.

Without torch: the advantages by hand; micro-batches adding up to the whole batch for every option, in
the sums and through the train step's accumulation; padding and masked tokens having no effect whatever
they hold; packed rows equal to one completion per row; the reference run in the step equal to the
precomputed one; the on-policy loss without old log-probabilities.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from model import ModelConfig, Transformer, init_params
from model.weights import hf
from train import policy_gradient as pg
from train import step as step_lib
from train.state import TrainState

pytestmark = [pytest.mark.parity, pytest.mark.slow]

VOCAB = 400
G = 4
EOS = 393  # tests/tokenizers_for_tests.py's <|end_of_text|> in a 400-token vocabulary
PROMPTS = [[17, 120, 33, 250, 7], [88, 9, 301], [5, 61, 140, 222]]
MAX_COMPLETION = 6
# Four completions of each prompt: some end with EOS, the others are cut at MAX_COMPLETION tokens.
COMPLETIONS = [
    [40, 41, EOS], [42, 43, 44, 45, 46, 47], [48, EOS], [49, 50, 51, 52, EOS],
    [60, 61, 62, 63, 64, 65], [66, EOS], [67, 68, 69, EOS], [70, 71, 72, 73, 74, EOS],
    [80, 81, EOS], [82, 83, 84, EOS], [85, 86, 87, 88, 89, 90], [EOS],
]
# The third group's rewards are all equal: zero standard deviation, no advantage.
REWARDS = [1.0, 0.0, 0.5, 0.0, 0.2, 1.0, 0.7, 0.0, 0.3, 0.3, 0.3, 0.3]
EPSILON, EPSILON_HIGH, BETA = 0.2, 0.28, 0.04
# (loss_type, beta, importance_sampling_level, temperature, use_bias_correction_kl)
LOSSES = [(loss, beta, 'token', 1.0, True) for loss in ('grpo', 'dapo', 'bnpo', 'dr_grpo')
          for beta in (0.0, BETA)]
LOSSES += [('grpo', BETA, 'sequence', 1.0, True), ('dr_grpo', BETA, 'token', 1.0, False),
           ('dapo', 0.0, 'token', 0.7, True)]
# With mask_truncated_completions: the completions cut short lose their loss weight, and still count.
MASKED = [('grpo', BETA, 'token', 1.0, True), ('grpo', BETA, 'sequence', 1.0, True),
          ('dr_grpo', BETA, 'token', 1.0, True), ('dapo', BETA, 'token', 1.0, True)]
GRADIENTS = [('dapo', BETA, 'token', 1.0, True), ('grpo', BETA, 'sequence', 1.0, True),
             ('dr_grpo', BETA, 'token', 1.0, False)]
TRL_METRICS = ('entropy', 'clip_ratio/low_mean', 'clip_ratio/high_mean', 'clip_ratio/region_mean')
ATOL = 1e-5


def _samples():
  return [(PROMPTS[i // G], c) for i, c in enumerate(COMPLETIONS)]


def _batch(samples, seq_len=16, per_row=1):
  """Our batch of (prompt, completion) samples, `per_row` packed in each row; and where completion i's
  token j stands: `where[i] = (row, first position)`, the token at first position + j."""
  rows = -(-len(samples) // per_row)
  batch = {k: np.zeros((rows, seq_len), np.int32) for k in ('inputs', 'targets', 'segment_ids', 'positions')}
  batch['loss_weights'] = np.zeros((rows, seq_len), np.float32)
  where = []
  for i, (prompt, completion) in enumerate(samples):
    row, segment = divmod(i, per_row)
    start = int((batch['segment_ids'][row] > 0).sum())
    tokens = prompt + completion
    n = len(tokens) - 1
    assert start + n <= seq_len
    span = slice(start, start + n)
    batch['inputs'][row, span], batch['targets'][row, span] = tokens[:-1], tokens[1:]
    batch['segment_ids'][row, span], batch['positions'][row, span] = segment + 1, np.arange(n)
    first = start + len(prompt) - 1
    batch['loss_weights'][row, first:first + len(completion)] = 1
    where.append((row, first))
  return batch, where


def _per_token(values, where, shape):
  """[completions, C] values (TRL's layout: token j of completion i at [i, j]) -> ours [B, T]."""
  out = np.zeros(shape, np.float32)
  for i, (row, first) in enumerate(where):
    n = len(COMPLETIONS[i])
    out[row, first:first + n] = values[i][:n]
  return out


def _trl_layout(ours, where):
  return np.stack([np.pad(ours[row, first:first + len(c)], (0, MAX_COMPLETION - len(c)))
                   for (row, first), c in zip(where, COMPLETIONS)])


def _with_rl_keys(batch, where, advantages, old_logps, ref_logps=None):
  """`batch` plus the per-token advantages (one per completion) and old (and reference) log-probs."""
  shape = batch['inputs'].shape
  out = dict(batch, advantages=_per_token(np.repeat(np.asarray(advantages)[:, None], MAX_COMPLETION, 1),
                                          where, shape),
             old_logps=_per_token(old_logps, where, shape))
  if ref_logps is not None:
    out['ref_logps'] = _per_token(ref_logps, where, shape)
  return out


def _objective(model, loss_type='dapo', beta=0.0, level='token', temperature=1.0, bias_correction=True, **kw):
  return pg.PolicyGradient(model, loss_type, EPSILON, EPSILON_HIGH, beta, MAX_COMPLETION, level,
                           temperature, bias_correction, **kw)


def _sgd_step(objective, params, batch, lr=1.0, grad_accum_steps=1):
  """One plain SGD step of the shared train step: (metrics, gradients as -(new - old) / lr)."""
  tx = optax.sgd(lr)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  train_step = step_lib.make_train_step(objective.model, tx, lambda _: lr, objective=objective,
                                        grad_accum_steps=grad_accum_steps)
  new, metrics = jax.jit(train_step)(state, batch)
  grads = jax.tree.map(lambda a, b: (np.asarray(a, np.float64) - np.asarray(b)) / lr, params, new.params)
  return jax.device_get(metrics), grads


# --------------------------------------------------------------------------------------------------
# Parity with TRL

@pytest.fixture(scope='module')
def trl_side(tmp_path_factory):
  """TRL's inputs to the loss (advantages, masks, old and reference log-probs), its per-token log-probs
  and entropies, advantages of each scaling, and each LOSSES entry's loss, metrics (and gradients)."""
  torch = pytest.importorskip('torch', reason='torch is not installed')
  transformers = pytest.importorskip('transformers', reason='transformers is not installed')
  trl = pytest.importorskip('trl', reason='trl is not installed')
  datasets = pytest.importorskip('datasets', reason='datasets is not installed')
  from tests.hf_models import random_llama  # pylint: disable=import-outside-toplevel
  from tests.tokenizers_for_tests import make_hf_tokenizer  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp('grpo_parity')
  tokenizer = transformers.AutoTokenizer.from_pretrained(make_hf_tokenizer(root / 'tok', VOCAB, 'llama3'))
  assert tokenizer.eos_token_id == EOS
  for name, seed in (('policy', 0), ('reference', 1)):
    random_llama(VOCAB, seed).save_pretrained(root / name)
  dataset = datasets.Dataset.from_list([{'prompt': f'prompt {i}'} for i in range(len(PROMPTS))])
  examples = [{'prompt': f'prompt {i // G}'} for i in range(len(COMPLETIONS))]

  def rollout(prompts, trainer):
    del trainer
    assert prompts == [e['prompt'] for e in examples]
    return {'prompt_ids': [p for p, _ in _samples()], 'completion_ids': COMPLETIONS, 'logprobs': None}

  def reward(prompts, completions, completion_ids, **kwargs):
    del prompts, completions, kwargs
    assert completion_ids == COMPLETIONS
    return list(REWARDS)

  def config(cls=trl.GRPOConfig, **options):
    return cls(output_dir=str(root / 'trl'), per_device_train_batch_size=len(COMPLETIONS), num_generations=G,
               max_completion_length=MAX_COMPLETION, use_cpu=True, bf16=False, report_to='none',
               disable_tqdm=True, seed=0, **options)

  def grpo(loss_type='dapo', beta=0.0, level='token', temperature=1.0, bias_correction=True, **options):
    with pytest.MonkeyPatch.context() as env:
      env.setenv('TRL_EXPERIMENTAL_SILENCE', '1')  # that rollout_func is experimental in TRL
      trainer = trl.GRPOTrainer(
          model=str(root / 'policy'), reward_funcs=reward, train_dataset=dataset, processing_class=tokenizer,
          rollout_func=rollout,
          args=config(loss_type=loss_type, beta=beta, epsilon=EPSILON, epsilon_high=EPSILON_HIGH,
                      importance_sampling_level=level, temperature=temperature,
                      use_bias_correction_kl=bias_correction, **options))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # what Trainer.train sets, without accumulation
    return trainer

  out = {'advantages': {}, 'zero_std': {}}
  for kind, scale in (('grpo', 'group'), ('dr_grpo', 'none')):
    trainer = grpo(scale_rewards=scale)
    out['advantages'][kind] = trainer._generate_and_score_completions(examples)['advantages'].numpy()
    out['zero_std'][kind] = trainer._metrics['train']['frac_reward_zero_std'][-1]
  rloo = trl.RLOOTrainer(model=str(root / 'policy'), reward_funcs=reward, train_dataset=dataset,
                         processing_class=tokenizer, args=config(trl.RLOOConfig, beta=0.0))
  rloo.model.train()
  # Its sampler, replaced: the fixed completions, as the GRPO trainers' rollout_func gives them.
  rloo._generate = lambda prompts: ([p for p, _ in _samples()], COMPLETIONS,
                                    tokenizer.batch_decode(COMPLETIONS, skip_special_tokens=True))
  out['advantages']['rloo'] = rloo._generate_and_score_completions(examples)['advantages'].numpy()
  out['zero_std']['rloo'] = rloo._metrics['train']['frac_reward_zero_std'][-1]

  # The loss's inputs, the reference's log-probabilities computed by TRL with the other model's weights.
  reference = transformers.AutoModelForCausalLM.from_pretrained(root / 'reference', dtype=torch.float32)
  trainer = grpo(beta=BETA)
  trainer.ref_model.load_state_dict(reference.state_dict())
  inputs = trainer._generate_and_score_completions(examples)
  ids = torch.cat([inputs['prompt_ids'], inputs['completion_ids']], 1)
  attention = torch.cat([inputs['prompt_mask'], inputs['completion_mask']], 1)
  with torch.no_grad():
    logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, ids, attention, MAX_COMPLETION, compute_entropy=True)
    cold_trainer = grpo(temperature=0.7)
    cold, cold_entropies, _ = cold_trainer._get_per_token_logps_and_entropies(
        cold_trainer.model, ids, attention, MAX_COMPLETION, compute_entropy=True)
  # The sampler's log-probabilities, off by up to 0.5 nats: ratios from 0.6 to 1.6, past both clip bounds.
  noise = np.random.default_rng(0).uniform(-0.5, 0.5, logps.shape).astype(np.float32)
  inputs['old_per_token_logps'] = logps + torch.tensor(noise) * inputs['completion_mask']
  out.update(inputs={k: v.numpy() if hasattr(v, 'numpy') else v for k, v in inputs.items()},
             logps=logps.numpy(), entropies=entropies.numpy(), cold_logps=cold.numpy(),
             cold_entropies=cold_entropies.numpy(), losses={}, metrics={}, grads={}, grad_norms={},
             masked_losses={})

  masked = grpo(beta=BETA, mask_truncated_completions=True)
  masked.ref_model.load_state_dict(reference.state_dict())
  masked_inputs = masked._generate_and_score_completions(examples)
  masked_inputs['old_per_token_logps'] = inputs['old_per_token_logps']
  out['masked_completion_mask'] = masked_inputs['completion_mask'].numpy()
  for options in MASKED:
    trainer = grpo(*options, mask_truncated_completions=True)
    with torch.no_grad():
      out['masked_losses'][options] = trainer._compute_loss(trainer.model, masked_inputs).item()

  for options in LOSSES:
    trainer = grpo(*options)
    loss = trainer._compute_loss(trainer.model, inputs)
    out['losses'][options] = loss.item()
    out['metrics'][options] = {k: v[-1] for k, v in trainer._metrics['train'].items()}
    if options in GRADIENTS:
      loss.backward()
      grads = {n: p.grad.numpy() for n, p in trainer.model.named_parameters()}
      out['grads'][options] = grads
      out['grad_norms'][options] = float(np.sqrt(sum(np.sum(np.square(g, dtype=np.float64))
                                                     for g in grads.values())))
  out['root'] = root
  return out


@pytest.fixture(scope='module')
def ours(trl_side):
  """(model, policy params, reference params) imported from the transformers folders."""
  root = trl_side['root']
  with open(root / 'policy' / 'config.json') as f:
    cfg = hf.config_from_hf(json.load(f), dtype='float32')[0]
  load = lambda name: jax.tree.map(jnp.asarray,
                                   hf.load_hf_params(str(root / name), cfg, np.float32, log=None))
  return Transformer(cfg), load('policy'), load('reference')


def test_log_probabilities_and_entropies_equal_trls(trl_side, ours):
  model, params, reference = ours
  batch, where = _batch(_samples())
  mask = trl_side['inputs']['completion_mask']
  for temperature, logps, entropies in ((1.0, 'logps', 'entropies'), (0.7, 'cold_logps', 'cold_entropies')):
    got = jax.jit(lambda p, b, t=temperature: pg.token_logps_and_entropies(model, p, b, temperature=t))(
        params, batch)
    np.testing.assert_allclose(_trl_layout(np.asarray(got[0]), where), trl_side[logps] * mask, atol=ATOL,
                               err_msg=f'log-probabilities at temperature {temperature}')
    np.testing.assert_allclose(_trl_layout(np.asarray(got[1]), where), trl_side[entropies] * mask, atol=ATOL,
                               err_msg=f'entropies at temperature {temperature}')
  # The reference pass (make_token_logps_step), in chunks of the sequence as well.
  for chunk in (0, 4):
    ref = jax.jit(pg.make_token_logps_step(model, chunk))(reference, batch)
    np.testing.assert_allclose(_trl_layout(np.asarray(ref), where),
                               trl_side['inputs']['ref_per_token_logps'] * mask, atol=ATOL)


def test_advantages_equal_trls(trl_side):
  for kind in pg.ADVANTAGES:
    advantages, zero_std = pg.group_advantages(REWARDS, G, kind)
    np.testing.assert_allclose(advantages, trl_side['advantages'][kind], atol=ATOL, err_msg=kind)
    assert zero_std == pytest.approx(trl_side['zero_std'][kind]) == 1 / 3


def _rl_batch(trl_side, ours):
  """Our batch of the samples, with TRL's old log-probabilities and our reference's."""
  model, _, reference = ours
  inputs = trl_side['inputs']
  batch, where = _batch(_samples())
  ref = np.asarray(jax.jit(pg.make_token_logps_step(model))(reference, batch))
  return _with_rl_keys(batch, where, pg.group_advantages(REWARDS, G, 'grpo')[0],
                       inputs['old_per_token_logps'], _trl_layout(ref, where))


def test_losses_and_metrics_equal_trls(trl_side, ours):
  model, params, _ = ours
  batch = _rl_batch(trl_side, ours)
  clipped = []
  forward = jax.jit(lambda p, b, t: pg.token_logps_and_entropies(model, p, b, temperature=t),
                    static_argnums=2)
  for options in LOSSES:
    objective = _objective(model, *options)
    logps, entropies = forward(params, batch, options[3])
    sums = jax.device_get(objective.token_sums(logps, entropies, batch, batch['ref_logps']))
    metrics = objective.metrics(sums, max(sums['weight'], 1.0))
    np.testing.assert_allclose(metrics['loss'], trl_side['losses'][options], atol=ATOL, err_msg=str(options))
    theirs = trl_side['metrics'][options]
    for name in TRL_METRICS + (('kl',) if options[1] else ()):
      np.testing.assert_allclose(metrics[name], theirs[name], atol=ATOL, err_msg=f'{options} {name}')
    assert ('kl' in metrics) == bool(options[1])
    clipped.append((metrics['clip_ratio/low_mean'], metrics['clip_ratio/high_mean']))
    mask = trl_side['inputs']['completion_mask']
    gap = np.abs(trl_side['inputs']['old_per_token_logps'] - trl_side['logps'])[mask > 0].mean()
    if options[3] == 1.0:
      np.testing.assert_allclose(metrics['sampler_logp_gap'], gap, atol=ATOL)
    assert metrics['tokens'] == mask.sum() and metrics['sequences'] == len(COMPLETIONS)
  # The perturbed old log-probabilities clip on both sides.
  assert min(low for low, _ in clipped[:8]) > 0 and min(high for _, high in clipped[:8]) > 0


def test_masked_truncated_completions_count_as_trls(trl_side, ours):
  model, params, _ = ours
  batch = _rl_batch(trl_side, ours)
  for i, (row, first) in enumerate(_batch(_samples())[1]):
    if COMPLETIONS[i][-1] != EOS:  # cut at MAX_COMPLETION tokens
      batch['loss_weights'][row, first:first + len(COMPLETIONS[i])] = 0
  assert batch['loss_weights'].sum() == trl_side['masked_completion_mask'].sum() < sum(map(len, COMPLETIONS))
  logps, entropies = jax.jit(lambda p, b: pg.token_logps_and_entropies(model, p, b))(params, batch)
  for options in MASKED:
    objective = _objective(model, *options)
    sums = jax.device_get(objective.token_sums(logps, entropies, batch, batch['ref_logps']))
    assert sums['sequences'] == len(COMPLETIONS)
    np.testing.assert_allclose(sums['loss'] / sums['weight'], trl_side['masked_losses'][options], atol=ATOL,
                               err_msg=str(options))


@pytest.mark.parametrize('options', GRADIENTS, ids=lambda o: f'{o[0]}-{o[2]}-{"kl_ratio" if o[4] else "k3"}')
def test_one_sgd_step_follows_trls_gradients(trl_side, ours, options):
  model, params, _ = ours
  metrics, grads = _sgd_step(_objective(model, *options), params, _rl_batch(trl_side, ours))
  np.testing.assert_allclose(metrics['loss'], trl_side['losses'][options], atol=ATOL)
  np.testing.assert_allclose(metrics['grad_norm'], trl_side['grad_norms'][options], rtol=1e-5)
  theirs = trl_side['grads'][options]
  assert max(np.abs(g).max() for g in theirs.values()) > 100 * ATOL
  checked = set()
  for p in hf.param_map(model.config):
    for layer in range(model.config.n_layers) if p.layered else (None,):
      ours_hf = p.as_hf(_get(grads, p.path) if layer is None else _get(grads, p.path)[layer])
      name = p.hf_name.format(layer)
      expected = theirs[name].T if p.transposed else theirs[name]
      np.testing.assert_allclose(ours_hf, expected, atol=ATOL, err_msg=name)
      checked.add(name)
  assert checked == set(theirs)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


# --------------------------------------------------------------------------------------------------
# Without TRL: the model runs once per batch shape (jitted); the objective's sums of its log-probabilities
# and their gradients run eagerly, for every option.

TINY = ModelConfig(vocab_size=VOCAB, embed_dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                   mlp_dim=64, dtype='float32', max_seq_len=64)


@pytest.fixture(scope='module')
def tiny():
  """{model, params, reference, forward (jitted: params, batch -> log-probs, entropies), batch with
  every key, where (its completion positions), logps, entropies}."""
  model = Transformer(TINY)
  init = jax.jit(lambda key: nn.meta.unbox(init_params(TINY, key)))
  params, reference = init(jax.random.key(0)), init(jax.random.key(1))
  forward = jax.jit(lambda p, b: pg.token_logps_and_entropies(model, p, b))
  batch, where = _batch(_samples())
  logps, entropies = (np.asarray(x) for x in forward(params, batch))
  ref = np.asarray(forward(reference, batch)[0])
  noise = np.random.default_rng(1).uniform(-0.5, 0.5, batch['inputs'].shape).astype(np.float32)
  rl = _with_rl_keys(batch, where, pg.group_advantages(REWARDS, G, 'grpo')[0],
                     _trl_layout(logps + noise, where), _trl_layout(ref, where))
  return dict(model=model, params=params, reference=reference, forward=forward, batch=rl, where=where,
              logps=logps, entropies=entropies)


def _sums_and_grad(objective, logps, entropies, batch):
  """The objective's sums, and the gradient of its total with respect to the log-probabilities."""
  total = lambda x: objective.total(objective.token_sums(x, entropies, batch, batch.get('ref_logps')))
  sums = objective.token_sums(logps, entropies, batch, batch.get('ref_logps'))
  return jax.device_get(sums), np.asarray(jax.grad(total)(jnp.asarray(logps)))


def test_advantages_by_hand():
  rewards = [1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0]
  dr, zero_std = pg.group_advantages(rewards, 4, 'dr_grpo')
  np.testing.assert_allclose(dr, [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0], atol=1e-7)
  assert zero_std == 0.5
  rloo, _ = pg.group_advantages(rewards, 4, 'rloo')
  np.testing.assert_allclose(rloo, [1.0, -1 / 3, -1 / 3, -1 / 3, 0, 0, 0, 0], atol=1e-7)
  np.testing.assert_allclose(rloo, dr * 4 / 3, atol=1e-7)  # leave-one-out = G / (G - 1) x mean-centred
  # The sample standard deviation of (1, 0, 0, 0) is 0.5 (Bessel's correction; 0.433 without).
  grpo, _ = pg.group_advantages(rewards, 4, 'grpo')
  np.testing.assert_allclose(grpo[:4], np.array([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4), rtol=1e-6)
  assert pg.group_advantages([0.0, 1.0, 1.0, 0.0], 2, 'rloo')[0].tolist() == [-1.0, 1.0, 1.0, -1.0]
  for bad in (dict(rewards=[1.0, 2.0, 3.0], group_size=2), dict(rewards=[1.0, 2.0], group_size=1),
              dict(rewards=[1.0, float('nan')], group_size=2),
              dict(rewards=[1.0, 2.0], group_size=2, kind='ppo')):
    with pytest.raises(ValueError):
      pg.group_advantages(**bad)


ALL_LOSSES = [(loss, beta, level) for loss in pg.LOSS_TYPES for beta in (0.0, BETA)
              for level in pg.IMPORTANCE_SAMPLING_LEVELS]


def test_micro_batches_add_up_to_the_batch(tiny):
  batch, logps, entropies = tiny['batch'], tiny['logps'], tiny['entropies']
  rows = np.arange(len(logps))
  for options in ALL_LOSSES:
    objective = _objective(tiny['model'], *options)
    whole, whole_grad = _sums_and_grad(objective, logps, entropies, batch)
    # The step's split (train/step.py split_microbatches): micro-batch i holds rows i, i + 3, i + 6, ...
    parts = [_sums_and_grad(objective, logps[rows % 3 == i], entropies[rows % 3 == i],
                            {k: v[rows % 3 == i] for k, v in batch.items()}) for i in range(3)]
    for k in objective.sum_keys:
      np.testing.assert_allclose(sum(p[0][k] for p in parts), whole[k], rtol=1e-5, atol=1e-7,
                                 err_msg=f'{options} {k}')
    grad = np.zeros_like(whole_grad)
    for i, (_, g) in enumerate(parts):
      grad[rows % 3 == i] = g
    np.testing.assert_allclose(grad, whole_grad, rtol=1e-5, atol=1e-8, err_msg=str(options))
    assert whole['sequences'] == len(COMPLETIONS) and whole['loss'] != 0


def test_micro_batches_in_the_train_step(tiny):
  objective = _objective(tiny['model'], 'grpo', BETA, 'sequence')
  whole, whole_grads = _sgd_step(objective, tiny['params'], tiny['batch'])
  parts, parts_grads = _sgd_step(objective, tiny['params'], tiny['batch'], grad_accum_steps=3)
  for k, v in whole.items():
    np.testing.assert_allclose(parts[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
  for a, b in zip(jax.tree.leaves(whole_grads), jax.tree.leaves(parts_grads)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  assert whole['sequences'] == len(COMPLETIONS) and whole['grad_norm'] > 0


def test_padding_and_masked_tokens_have_no_effect(tiny):
  batch, logps, entropies = tiny['batch'], tiny['logps'], tiny['entropies']
  # Garbage wherever the loss weight is 0 (prompts, padding): in the per-token values, and in the tokens
  # of padding; plus two rows of pure padding.
  off = batch['loss_weights'] == 0
  pad = batch['segment_ids'] == 0
  garbage = dict(batch)
  garbage['advantages'] = np.where(off, 1e6, batch['advantages'])
  garbage['old_logps'] = np.where(off, np.inf, batch['old_logps'])
  garbage['ref_logps'] = np.where(off, -np.inf, batch['ref_logps'])
  garbage['inputs'] = np.where(pad, 7, batch['inputs'])
  garbage['targets'] = np.where(pad, 9, batch['targets'])
  extra = {k: np.zeros((2,) + v.shape[1:], v.dtype) for k, v in garbage.items()}
  extra['old_logps'][:] = np.nan
  garbage = {k: np.concatenate([v, extra[k]]) for k, v in garbage.items()}
  dirty_logps, dirty_entropies = (np.asarray(x) for x in tiny['forward'](tiny['params'], garbage))
  n = len(logps)
  np.testing.assert_allclose(dirty_logps[:n], logps, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(dirty_entropies[:n], entropies, rtol=1e-6, atol=1e-6)
  assert not dirty_logps[n:].any() and not dirty_entropies[n:].any() and not dirty_logps[:n][off].any()
  for options in ALL_LOSSES:
    objective = _objective(tiny['model'], *options)
    clean, clean_grad = _sums_and_grad(objective, logps, entropies, batch)
    dirty, dirty_grad = _sums_and_grad(objective, dirty_logps, dirty_entropies, garbage)
    for k in objective.sum_keys:
      np.testing.assert_allclose(dirty[k], clean[k], rtol=1e-5, atol=1e-7, err_msg=f'{options} {k}')
    assert np.isfinite(dirty_grad).all() and not dirty_grad[n:].any() and not dirty_grad[:n][off].any()
    np.testing.assert_allclose(dirty_grad[:n], clean_grad, rtol=1e-5, atol=1e-8, err_msg=str(options))


def test_packed_rows_equal_one_completion_per_row(tiny):
  batch, where = tiny['batch'], tiny['where']
  packed, packed_where = _batch(_samples(), seq_len=32, per_row=2)
  # The same per-token values, moved to where the packed rows hold each completion's tokens.
  move = lambda x: _per_token(_trl_layout(x, where), packed_where, packed['inputs'].shape)
  packed.update({k: move(batch[k]) for k in ('advantages', 'old_logps', 'ref_logps')})
  logps, entropies = (np.asarray(x) for x in tiny['forward'](tiny['params'], packed))
  np.testing.assert_allclose(logps, move(tiny['logps']), atol=1e-6)
  for options in ALL_LOSSES:
    objective = _objective(tiny['model'], *options)
    a, a_grad = _sums_and_grad(objective, tiny['logps'], tiny['entropies'], batch)
    b, b_grad = _sums_and_grad(objective, logps, entropies, packed)
    for k in objective.sum_keys:
      np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=f'{options} {k}')
    np.testing.assert_allclose(b_grad, move(a_grad), rtol=1e-5, atol=1e-8, err_msg=str(options))


def test_reference_in_the_step(tiny):
  """Without ref_logps in the batch, the reference runs in the step on the state's reference parameters."""
  model, batch = tiny['model'], tiny['batch']
  objective = _objective(model, 'grpo', BETA, reference_model=model)
  without = {k: v for k, v in batch.items() if k != 'ref_logps'}
  in_step = jax.jit(objective.sums)(tiny['params'], without, None, tiny['reference'])
  expected = objective.token_sums(tiny['logps'], tiny['entropies'], batch, batch['ref_logps'])
  for k in objective.sum_keys:
    np.testing.assert_allclose(in_step[k], expected[k], rtol=1e-5, atol=1e-7, err_msg=k)
  with pytest.raises(ValueError, match='reference'):
    objective.sums(tiny['params'], without)


def test_on_policy_without_old_logps(tiny):
  """Without old_logps the ratio is 1: the loss is -A per token, its gradient -A per token."""
  batch = {k: v for k, v in tiny['batch'].items() if k != 'old_logps'}
  sums, grad = _sums_and_grad(_objective(tiny['model'], 'dapo'), tiny['logps'], tiny['entropies'], batch)
  mask = batch['loss_weights']
  np.testing.assert_allclose(sums['loss'], -np.sum(batch['advantages'] * mask), rtol=1e-5)
  np.testing.assert_allclose(grad, -batch['advantages'] * mask, rtol=1e-6)
  assert sums['clip_region'] == 0 and sums['logp_gap'] == 0


def test_options_are_checked():
  model = Transformer(TINY)
  for bad in (dict(loss_type='ppo'), dict(loss_type='dr_grpo', max_completion_length=0),
              dict(importance_sampling_level='batch'), dict(temperature=0.0)):
    with pytest.raises(ValueError):
      pg.PolicyGradient(model, **bad)
  assert set(pg.batch_keys(reference=True)) == {'inputs', 'targets', 'segment_ids', 'positions',
                                                 'loss_weights', 'advantages', 'old_logps', 'ref_logps'}
  totals = {k: np.float32(2.0) for k in pg.PolicyGradient.sum_keys}
  results = pg.PolicyGradient(model, beta=BETA).eval_results(totals)
  assert results['eval_loss'] == 1.0 and results['eval_kl'] == 1.0 and results['eval_sequences'] == 2.0

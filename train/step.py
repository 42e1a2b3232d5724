"""The one train step, shared by pretraining, instruction tuning and preference tuning, and its eval
counterpart.

A batch is a dict of [B, T] arrays (data/batch.py: `inputs`, `targets`, `segment_ids`, `positions`,
`loss_weights`; preference pairs add `pair_ids`, `chosen` and maybe `ref_logps`). The step does not know
where the batch came from; it takes its objective from the config (train/run.py):
  LanguageModeling  sum(weights * cross-entropy) / sum(weights): pretraining and instruction tuning
                    alike, which differ only in which targets carry loss weight;
  Preference        the mean over the batch's preference pairs of a DPO-family loss (sigmoid, robust,
                    ipo, simpo) of the policy's and the frozen reference model's log-probabilities of
                    each pair's chosen and rejected completions.
An objective gives sums over a batch (so that microbatches and eval batches add up exactly), what the
gradient is taken of, the metrics, and the held-out results; the step around it (accumulation,
normalisation, clipping, the update, skipping non-finite steps) is the same for every objective.
"""

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from data.batch import max_pairs
from model import Transformer
from model import lora as lora_lib
from model import sharding as sharding_lib
from train.spec import PREFERENCE_LOSSES
from train.state import TrainState


def _log_z_and_target_logits(logits, targets):
  log_z = jax.nn.logsumexp(logits, axis=-1)
  return log_z, jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def _ce_sums(logits, targets, weights) -> dict[str, jax.Array]:
  log_z, target_logits = _log_z_and_target_logits(logits, targets)
  weights = weights.astype(jnp.float32)
  return {
      'ce': jnp.sum((log_z - target_logits) * weights),
      'z': jnp.sum(jnp.square(log_z) * weights),
      'weight': jnp.sum(weights),
  }


def loss_chunks(seq_len: int, chunk_len: int) -> int:
  """How many sequence chunks the loss is computed in: the fewest whose length divides `seq_len` and
  is at most `chunk_len` (0: one chunk, the whole sequence)."""
  if chunk_len <= 0 or chunk_len >= seq_len:
    return 1
  n = -(-seq_len // chunk_len)
  while seq_len % n:
    n += 1
  return n


def loss_sums(model: Transformer, params, batch, loss_chunk_len: int = 0,
              rngs=None) -> dict[str, jax.Array]:
  """Batch sums of weighted cross-entropy, weighted squared log-partition (z-loss), and weights.

  Sums rather than means so that microbatches and eval batches add up exactly. With `loss_chunk_len`
  (config.train.loss_chunk_len) shorter than the sequence, the float32 logits exist for one chunk of
  positions at a time, in the forward pass and (recomputed) in the backward pass: [B, T/n, V] instead
  of [B, T, V], which for a 128k vocabulary is the largest activation of the whole step. `rngs`: e.g.
  {'dropout': key} for LoRA dropout in training.
  """
  args = (batch['inputs'], batch['segment_ids'], batch['positions'])
  targets, weights = batch['targets'], batch['loss_weights']
  n = loss_chunks(targets.shape[1], loss_chunk_len)
  if n == 1:
    return _ce_sums(model.apply({'params': params}, *args, rngs=rngs), targets, weights)

  hidden = model.apply({'params': params}, *args, rngs=rngs, method=Transformer.hidden_states)

  @jax.checkpoint  # the backward pass recomputes each chunk's logits rather than storing them all
  def add_chunk(totals, chunk):
    h, t, w = chunk
    sums = _ce_sums(model.apply({'params': params}, h, method=Transformer.logits), t, w)
    return jax.tree.map(jnp.add, totals, sums), None

  zeros = {k: jnp.zeros((), jnp.float32) for k in ('ce', 'z', 'weight')}
  sums, _ = jax.lax.scan(add_chunk, zeros, (_chunked(hidden, n), _chunked(targets, n),
                                            _chunked(weights, n)))
  return sums


def _chunked(x, n: int):
  """[B, T, ...] -> [n, B, T/n, ...], each chunk keeping the batch sharding."""
  x = x.reshape((x.shape[0], n, x.shape[1] // n) + x.shape[2:]).swapaxes(0, 1)
  return nn.with_logical_constraint(x, (None,) + sharding_lib.BATCH_AXES + (None,) * (x.ndim - 3))


def token_logps(model: Transformer, params, batch, loss_chunk_len: int = 0, rngs=None) -> jax.Array:
  """[B, T] float32: the log-probability of each target with loss weight (0 elsewhere), the logits in
  sequence chunks as in `loss_sums`."""
  args = (batch['inputs'], batch['segment_ids'], batch['positions'])
  targets, weights = batch['targets'], batch['loss_weights']

  def logps(logits, t, w):
    log_z, target_logits = _log_z_and_target_logits(logits, t)
    return (target_logits - log_z) * w.astype(jnp.float32)

  n = loss_chunks(targets.shape[1], loss_chunk_len)
  if n == 1:
    return logps(model.apply({'params': params}, *args, rngs=rngs), targets, weights)
  hidden = model.apply({'params': params}, *args, rngs=rngs, method=Transformer.hidden_states)

  @jax.checkpoint
  def chunk_logps(carry, chunk):
    h, t, w = chunk
    return carry, logps(model.apply({'params': params}, h, method=Transformer.logits), t, w)

  _, out = jax.lax.scan(chunk_logps, (), (_chunked(hidden, n), _chunked(targets, n), _chunked(weights, n)))
  return out.swapaxes(0, 1).reshape(targets.shape)


def pair_sums(values, batch) -> jax.Array:
  """[B, T] per-token values -> [B, P, 2]: their sums over the chosen (0) and rejected (1) segment of
  each of the P = data.batch.max_pairs(T) pair slots of every row (0 for empty slots)."""
  b, t = values.shape
  slots = max_pairs(t) + 1  # slot 0 collects padding
  index = batch['pair_ids'] * 2 + (1 - batch['chosen'])
  sums = jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, num_segments=2 * slots))(values, index)
  return sums.reshape(b, slots, 2)[:, 1:]


def pair_logps(model: Transformer, params, batch, loss_chunk_len: int = 0, rngs=None):
  """([B, P, 2] log-probabilities of each pair's chosen and rejected completion, [B, P, 2] their
  numbers of tokens): sums over the completion tokens, as TRL's `logps`."""
  counts = pair_sums(batch['loss_weights'].astype(jnp.float32), batch)
  return pair_sums(token_logps(model, params, batch, loss_chunk_len, rngs), batch), counts


@dataclasses.dataclass(frozen=True)
class LanguageModeling:
  """Next-token cross-entropy on the targets with loss weight, plus `z_loss` x the squared log-partition
  (PaLM's z-loss): pretraining and instruction tuning."""
  model: Transformer
  z_loss: float = 0.0
  loss_chunk_len: int = 0
  sum_keys = ('ce', 'z', 'weight')

  def sums(self, params, batch, rngs=None, reference=None) -> dict[str, jax.Array]:
    del reference
    return loss_sums(self.model, params, batch, self.loss_chunk_len, rngs)

  def total(self, sums):
    return sums['ce'] + self.z_loss * sums['z']

  def metrics(self, sums, total_weight) -> dict[str, jax.Array]:
    """loss: the cross-entropy (without the z-loss term); log_z_squared: the mean squared log-partition
    that z-loss penalises (a sign of logits drifting, worth watching without it); z_loss: the term
    added to the loss, only where it is added; tokens: the tokens trained (loss weight)."""
    out = {'loss': sums['ce'] / total_weight, 'log_z_squared': sums['z'] / total_weight,
           'tokens': sums['weight']}
    if self.z_loss:
      out['z_loss'] = self.z_loss * sums['z'] / total_weight
    return out

  def eval_results(self, totals) -> dict[str, float]:
    loss = float(totals['ce'] / max(totals['weight'], 1.0))
    return {'eval_loss': loss, 'eval_perplexity': math.exp(min(loss, 50.0)),
            'eval_tokens': float(totals['weight'])}


# Preference losses (config.dpo.loss). With c, r the policy's and c', r' the reference's summed
# log-probabilities of a pair's chosen and rejected completions, n_c, n_r their token counts,
# d = (c - c') - (r - r'), beta and label smoothing e:
#   sigmoid  DPO (Rafailov et al. 2023): -log sigmoid(beta d); with e > 0, conservative DPO
#            -(1 - e) log sigmoid(beta d) - e log sigmoid(-beta d) (the DPO authors' cDPO note)
#   robust   robust DPO (Chowdhury et al. 2024): (-(1 - e) log sigmoid(beta d) + e log sigmoid(-beta d)) / (1 - 2e)
#   ipo      IPO (Azar et al. 2023), length-normalised as TRL: ((c - c')/n_c - (r - r')/n_r - 1/(2 beta))^2
#   simpo    SimPO (Meng et al. 2024), no reference model: z = beta (c/n_c - r/n_r) - gamma,
#            -(1 - e) log sigmoid(z) - e log sigmoid(-z)
# plus, with sft_weight w > 0, w x the chosen completion's mean negative log-likelihood -c/n_c (RPO,
# Pang et al. 2024: it keeps DPO from lowering the chosen answers' likelihood along with the rejected).
REFERENCE_FREE = ('simpo',)
# TRL's names for the per-pair metrics (rewards: beta x the log-ratio to the reference; SimPO: beta x
# the average log-probability), each a mean over pairs.
PAIR_METRICS = ('rewards/chosen', 'rewards/rejected', 'rewards/accuracies', 'rewards/margins',
                'logps/chosen', 'logps/rejected')


@dataclasses.dataclass(frozen=True)
class Preference:
  """A preference loss (PREFERENCE_LOSSES) over the pairs of the batch. The reference model's
  log-probabilities come from the batch (`ref_logps`, computed before training), or from
  `reference_model` run in the step on the state's reference parameters (`TrainState.reference_params`:
  the frozen starting parameters, or with LoRA the base with adapters off)."""
  model: Transformer
  loss: str = 'sigmoid'
  beta: float = 0.1
  label_smoothing: float = 0.0
  simpo_gamma: float = 0.5
  sft_weight: float = 0.0
  reference_model: Transformer | None = None
  loss_chunk_len: int = 0
  sum_keys = ('loss', 'weight', 'tokens') + PAIR_METRICS

  def _reference_logps(self, batch, reference):
    if self.loss in REFERENCE_FREE:
      return None
    if 'ref_logps' in batch:
      return pair_sums(batch['ref_logps'], batch)
    if self.reference_model is None or reference is None:
      raise ValueError('the preference loss needs the reference model: ref_logps in the batch, or its '
                       'parameters in the train state')
    return jax.lax.stop_gradient(pair_logps(self.reference_model, reference, batch,
                                            self.loss_chunk_len)[0])

  def pair_losses(self, logps, counts, ref_logps):
    """(per-pair loss, chosen reward, rejected reward, chosen logps, rejected logps), each [B, P]."""
    beta, e = self.beta, self.label_smoothing
    c, r = logps[..., 0], logps[..., 1]
    n_c, n_r = jnp.maximum(counts[..., 0], 1.0), jnp.maximum(counts[..., 1], 1.0)
    nll = -self.sft_weight * c / n_c if self.sft_weight else 0.0
    smoothed = lambda z: -(1 - e) * jax.nn.log_sigmoid(z) - e * jax.nn.log_sigmoid(-z)
    if self.loss == 'simpo':
      c, r = c / n_c, r / n_r
      return smoothed(beta * (c - r - self.simpo_gamma / beta)) + nll, beta * c, beta * r, c, r
    chosen_ratio, rejected_ratio = c - ref_logps[..., 0], r - ref_logps[..., 1]
    d = chosen_ratio - rejected_ratio
    if self.loss == 'sigmoid':
      losses = smoothed(beta * d)
    elif self.loss == 'robust':
      losses = (-(1 - e) * jax.nn.log_sigmoid(beta * d) + e * jax.nn.log_sigmoid(-beta * d)) / (1 - 2 * e)
    elif self.loss == 'ipo':
      losses = (chosen_ratio / n_c - rejected_ratio / n_r - 1 / (2 * beta)) ** 2
    else:
      raise ValueError(f'dpo.loss must be one of {PREFERENCE_LOSSES}, got {self.loss!r}')
    return losses + nll, beta * chosen_ratio, beta * rejected_ratio, c, r

  def sums(self, params, batch, rngs=None, reference=None) -> dict[str, jax.Array]:
    logps, counts = pair_logps(self.model, params, batch, self.loss_chunk_len, rngs)
    losses, chosen, rejected, logp_c, logp_r = self.pair_losses(
        logps, counts, self._reference_logps(batch, reference))
    present = (counts[..., 0] > 0) & (counts[..., 1] > 0)
    total = lambda x: jnp.sum(jnp.where(present, x, 0.0))
    return {'loss': total(losses), 'weight': jnp.sum(present.astype(jnp.float32)),
            'tokens': jnp.sum(batch['loss_weights'].astype(jnp.float32)),
            'rewards/chosen': total(chosen), 'rewards/rejected': total(rejected),
            'rewards/accuracies': total((chosen > rejected).astype(jnp.float32)),
            'rewards/margins': total(chosen - rejected), 'logps/chosen': total(logp_c),
            'logps/rejected': total(logp_r)}

  def total(self, sums):
    return sums['loss']

  def metrics(self, sums, total_weight) -> dict[str, jax.Array]:
    return {'loss': sums['loss'] / total_weight, 'tokens': sums['tokens'],
            **{k: sums[k] / total_weight for k in PAIR_METRICS}}

  def eval_results(self, totals) -> dict[str, float]:
    pairs = max(float(totals['weight']), 1.0)
    return {'eval_loss': float(totals['loss']) / pairs,
            **{f'eval_{k}': float(totals[k]) / pairs for k in PAIR_METRICS},
            'eval_pairs': float(totals['weight'])}


def split_microbatches(batch, num_microbatches: int):
  """[B, ...] -> [A, B/A, ...] where microbatch i takes rows i, i+A, i+2A, ...

  Strided rather than contiguous, so each microbatch stays spread over every data-parallel shard.
  """
  def split(x):
    b = x.shape[0]
    x = x.reshape((b // num_microbatches, num_microbatches) + x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None,) + sharding_lib.BATCH_AXES)
  return jax.tree.map(split, batch)


def make_train_step(model: Transformer, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    *, grad_accum_steps: int = 1, z_loss: float = 0.0,
                    loss_chunk_len: int = 0, seed: int = 0, objective=None) -> Callable:
  """Returns the pure `train_step(state, batch) -> (state, metrics)` of `objective` (default: language
  modeling with `z_loss` and `loss_chunk_len`).

  Gradients and updates are for `state.params` only: with LoRA those are the adapters, and the frozen
  base (`state.frozen`) goes through the step untouched, as does a preference objective's reference
  (`state.reference`). LoRA dropout draws from `seed` and the step number, so a resumed run draws the
  same masks.
  """
  objective = objective or LanguageModeling(model, z_loss, loss_chunk_len)

  def loss_fn(params, batch, frozen, reference, rng):
    params = params if frozen is None else lora_lib.join(frozen, params)
    rngs = {'dropout': rng} if model.lora.dropout else None
    sums = objective.sums(params, batch, rngs, reference)
    return objective.total(sums), sums

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def accumulated_grads(params, batch, frozen, reference, rng):
    if grad_accum_steps == 1:
      return grad_fn(params, batch, frozen, reference, rng)

    def add_microbatch(acc, microbatch_and_index):
      microbatch, i = microbatch_and_index
      grads, sums = grad_fn(params, microbatch, frozen, reference, jax.random.fold_in(rng, i))
      return jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, (grads, sums)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    zero_sums = {k: jnp.zeros((), jnp.float32) for k in objective.sum_keys}
    (grads, sums), _ = jax.lax.scan(add_microbatch, (zeros, zero_sums),
                                    (split_microbatches(batch, grad_accum_steps),
                                     jnp.arange(grad_accum_steps)))
    return jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params), sums

  def train_step(state: TrainState, batch) -> tuple[TrainState, dict[str, Any]]:
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    grads, sums = accumulated_grads(state.params, batch, state.frozen, state.reference_params, rng)
    total_weight = jnp.maximum(sums['weight'], 1.0)
    grads = jax.tree.map(lambda g: g / total_weight.astype(g.dtype), grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite loss or gradient leaves parameters and optimizer state exactly as they were; the
    # step still counts (its batch was consumed), and the loop decides when too many in a row is fatal.
    finite = jnp.isfinite(objective.total(sums)) & jnp.isfinite(grad_norm)
    keep_if_bad = lambda new, old: jnp.where(finite, new, old)
    params = jax.tree.map(keep_if_bad, params, state.params)
    opt_state = jax.tree.map(keep_if_bad, opt_state, state.opt_state)
    metrics = {
        **objective.metrics(sums, total_weight),
        'grad_norm': grad_norm,
        'learning_rate': schedule(state.step),
        'skipped': 1 - finite.astype(jnp.int32),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(objective) -> Callable:
  """`eval_step(state, batch) -> sums` of `objective` (the state's whole model, and its reference);
  callers add sums over batches, then take `objective.eval_results`."""
  return lambda state, batch: objective.sums(state.model_params, batch, None, state.reference_params)


def make_reference_step(model: Transformer, loss_chunk_len: int = 0) -> Callable:
  """`reference_step(params, batch) -> (logps [B, P, 2], example_ids [B, P])`: the log-probabilities
  of `model` (the reference) for each pair of the batch, and the pair's `example_ids`; what
  train/reference_pass.py computes once before training."""
  def reference_step(params, batch):
    logps, counts = pair_logps(model, params, batch, loss_chunk_len)
    slots = counts.shape[1] + 1
    ids = jax.vmap(lambda e, p: jax.ops.segment_max(e, p, num_segments=slots))(
        batch['example_ids'], batch['pair_ids'])[:, 1:]
    return logps, jnp.where(counts[..., 0] > 0, ids, -1)
  return reference_step


def jit_train_step(train_step, state_shardings, mesh, rules=sharding_lib.LOGICAL_AXIS_RULES):
  """Jits the step over `mesh`: state keeps its sharding and is donated; metrics are replicated."""
  return jax.jit(sharding_lib.with_logical_rules(train_step, mesh, rules),
                 in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh, rules)),
                 out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
                 donate_argnums=(0,))


def jit_reference_step(reference_step, params_shardings, mesh, rules=sharding_lib.LOGICAL_AXIS_RULES):
  return jax.jit(sharding_lib.with_logical_rules(reference_step, mesh, rules),
                 in_shardings=(params_shardings, sharding_lib.batch_sharding(mesh, rules)),
                 out_shardings=sharding_lib.replicated(mesh))


def jit_eval_step(eval_step, state_shardings, mesh, rules=sharding_lib.LOGICAL_AXIS_RULES):
  return jax.jit(sharding_lib.with_logical_rules(eval_step, mesh, rules),
                 in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh, rules)),
                 out_shardings=sharding_lib.replicated(mesh))

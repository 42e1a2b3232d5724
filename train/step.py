"""The one train step, shared by pretraining and instruction tuning, and its eval counterpart.

A batch is a dict of [B, T] arrays (data/batch.py: `inputs`, `targets`, `segment_ids`, `positions`,
`loss_weights`). The step does not know where the batch came from: pretraining and instruction tuning
differ only in which targets carry loss weight. The loss is sum(weights * cross-entropy) / sum(weights).
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from model import Transformer
from model import lora as lora_lib
from model import sharding as sharding_lib
from train.state import TrainState


def _ce_sums(logits, targets, weights) -> dict[str, jax.Array]:
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
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

  def chunked(x):  # [B, T, ...] -> [n, B, T/n, ...], each chunk keeping the batch sharding
    x = x.reshape((x.shape[0], n, x.shape[1] // n) + x.shape[2:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None,) + sharding_lib.BATCH_AXES + (None,) * (x.ndim - 3))

  @jax.checkpoint  # the backward pass recomputes each chunk's logits rather than storing them all
  def add_chunk(totals, chunk):
    h, t, w = chunk
    sums = _ce_sums(model.apply({'params': params}, h, method=Transformer.logits), t, w)
    return jax.tree.map(jnp.add, totals, sums), None

  zeros = {k: jnp.zeros((), jnp.float32) for k in ('ce', 'z', 'weight')}
  sums, _ = jax.lax.scan(add_chunk, zeros, (chunked(hidden), chunked(targets), chunked(weights)))
  return sums


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
                    loss_chunk_len: int = 0, seed: int = 0) -> Callable:
  """Returns the pure `train_step(state, batch) -> (state, metrics)`.

  Gradients and updates are for `state.params` only: with LoRA those are the adapters, and the frozen
  base (`state.frozen`) goes through the step untouched. LoRA dropout draws from `seed` and the step
  number, so a resumed run draws the same masks.
  """

  def objective(params, batch, frozen, rng):
    params = params if frozen is None else lora_lib.join(frozen, params)
    rngs = {'dropout': rng} if model.lora.dropout else None
    sums = loss_sums(model, params, batch, loss_chunk_len, rngs)
    return sums['ce'] + z_loss * sums['z'], sums

  grad_fn = jax.grad(objective, has_aux=True)

  def accumulated_grads(params, batch, frozen, rng):
    if grad_accum_steps == 1:
      return grad_fn(params, batch, frozen, rng)

    def add_microbatch(acc, microbatch_and_index):
      microbatch, i = microbatch_and_index
      grads, sums = grad_fn(params, microbatch, frozen, jax.random.fold_in(rng, i))
      return jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, (grads, sums)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    zero_sums = {k: jnp.zeros((), jnp.float32) for k in ('ce', 'z', 'weight')}
    (grads, sums), _ = jax.lax.scan(add_microbatch, (zeros, zero_sums),
                                    (split_microbatches(batch, grad_accum_steps),
                                     jnp.arange(grad_accum_steps)))
    return jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params), sums

  def train_step(state: TrainState, batch) -> tuple[TrainState, dict[str, Any]]:
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    grads, sums = accumulated_grads(state.params, batch, state.frozen, rng)
    total_weight = jnp.maximum(sums['weight'], 1.0)
    grads = jax.tree.map(lambda g: g / total_weight.astype(g.dtype), grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite loss or gradient leaves parameters and optimizer state exactly as they were; the
    # step still counts (its batch was consumed), and the loop decides when too many in a row is fatal.
    finite = jnp.isfinite(sums['ce'] + z_loss * sums['z']) & jnp.isfinite(grad_norm)
    keep_if_bad = lambda new, old: jnp.where(finite, new, old)
    params = jax.tree.map(keep_if_bad, params, state.params)
    opt_state = jax.tree.map(keep_if_bad, opt_state, state.opt_state)
    metrics = {
        'loss': sums['ce'] / total_weight,
        'z_loss': sums['z'] / total_weight,
        'grad_norm': grad_norm,
        'learning_rate': schedule(state.step),
        'tokens': sums['weight'],
        'skipped': 1 - finite.astype(jnp.int32),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                      frozen=state.frozen), metrics

  return train_step


def make_eval_step(model: Transformer, loss_chunk_len: int = 0) -> Callable:
  """`eval_step(params, batch) -> sums` (`params`: the whole model's, `TrainState.model_params`);
  callers add sums over batches, then divide."""
  return lambda params, batch: loss_sums(model, params, batch, loss_chunk_len)


def jit_train_step(train_step, state_shardings, mesh, rules=sharding_lib.LOGICAL_AXIS_RULES):
  """Jits the step over `mesh`: state keeps its sharding and is donated; metrics are replicated."""
  return jax.jit(sharding_lib.with_logical_rules(train_step, mesh, rules),
                 in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh, rules)),
                 out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
                 donate_argnums=(0,))


def jit_eval_step(eval_step, params_shardings, mesh, rules=sharding_lib.LOGICAL_AXIS_RULES):
  return jax.jit(sharding_lib.with_logical_rules(eval_step, mesh, rules),
                 in_shardings=(params_shardings, sharding_lib.batch_sharding(mesh, rules)),
                 out_shardings=sharding_lib.replicated(mesh))

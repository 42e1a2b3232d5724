"""The optimizer: AdamW with warmup + cosine decay, global-norm clipping, no decay on norms and biases."""

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

# Parameters whose leaf name matches are not weight-decayed: RMSNorm scales and attention biases.
NO_DECAY_SUFFIXES = ('scale', '_bias')


def learning_rate_schedule(opt: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at `decay_steps`.

  Shifted by one so that the first update already uses lr / warmup_steps rather than 0.
  """
  decay_steps = opt['decay_steps'] or total_steps
  warmup = min(opt['warmup_steps'], decay_steps)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt['lr'], warmup_steps=warmup,
      decay_steps=max(decay_steps, warmup + 1), end_value=opt['lr'] * opt['min_lr_ratio'])
  return lambda step: schedule(step + 1)


def _leaf_name(path) -> str:
  names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  return str(names[-1]) if names else ''


def weight_decay_mask(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not _leaf_name(path).endswith(NO_DECAY_SUFFIXES), params)


def with_state_dtype(tx: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
  """Stores every floating-point leaf of `tx`'s state (Adam's moments) in `dtype`.

  The update itself runs in float32 (the state is promoted where it meets float32 gradients) and is
  rounded back to `dtype` when stored: Adam's `mu` via its `mu_dtype`, `nu` because optax keeps `nu` in
  the dtype it was created with.
  """
  dtype = jnp.dtype(dtype)

  def init(params):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                        tx.init(params))

  return optax.GradientTransformation(init, tx.update)


def make_optimizer(opt: Mapping[str, Any], total_steps: int):
  """Returns (optax transformation, learning-rate schedule).

  `opt['state_dtype']` ('' by default: the parameters' dtype) sets the dtype of Adam's moments, e.g.
  'bfloat16' to halve the optimizer state of float32 parameters.
  """
  schedule = learning_rate_schedule(opt, total_steps)
  state_dtype = opt.get('state_dtype', '') or None
  parts = []
  if opt['grad_clip'] > 0:
    parts.append(optax.clip_by_global_norm(opt['grad_clip']))
  adamw = optax.adamw(schedule, b1=opt['b1'], b2=opt['b2'], eps=opt['eps'], mu_dtype=state_dtype,
                      weight_decay=opt['weight_decay'], mask=weight_decay_mask)
  parts.append(with_state_dtype(adamw, state_dtype) if state_dtype else adamw)
  return optax.chain(*parts), schedule

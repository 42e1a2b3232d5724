"""The training state (step, params, optimizer state) and how to create it already sharded."""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from model import ModelConfig, Transformer
from train import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def _boxed_state(model: Transformer, tx: optax.GradientTransformation, rng):
  """State whose leaves still carry logical-axis metadata (flax LogicallyPartitioned boxes)."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = model.init(rng, tokens)['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def state_shardings(model: Transformer, tx, mesh: Mesh, rules=sharding_lib.LOGICAL_AXIS_RULES):
  """NamedShardings for every leaf of the state, from the logical axes the model declares."""
  abstract = jax.eval_shape(lambda: _boxed_state(model, tx, jax.random.key(0)))
  return sharding_lib.logical_to_sharding(nn.get_partition_spec(abstract), mesh, rules)


def abstract_state(model: Transformer, tx, mesh: Mesh, rules=sharding_lib.LOGICAL_AXIS_RULES):
  """ShapeDtypeStructs with shardings: the target for restoring a checkpoint onto `mesh`."""
  shapes = nn.meta.unbox(jax.eval_shape(lambda: _boxed_state(model, tx, jax.random.key(0))))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, state_shardings(model, tx, mesh, rules))


def init_state(model: Transformer, tx, mesh: Mesh, seed: int, params=None,
               rules=sharding_lib.LOGICAL_AXIS_RULES) -> TrainState:
  """A fresh state, created directly in its sharded layout (no host ever holds the full model).

  With `params` given (e.g. from a pretraining checkpoint), they are used instead of a random init
  and the optimizer starts fresh.
  """
  shardings = state_shardings(model, tx, mesh, rules)
  if params is None:
    init = lambda rng: nn.meta.unbox(_boxed_state(model, tx, rng))
    return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
  params = jax.device_put(params, shardings.params)
  init = lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))
  return jax.jit(init, out_shardings=shardings, donate_argnums=0)(params)


def count_params(model_config: ModelConfig) -> int:
  shapes = jax.eval_shape(Transformer(model_config).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  return sum(x.size for x in jax.tree.leaves(nn.meta.unbox(shapes)))

"""The training state (step, params, optimizer state) and how to create it already sharded."""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from model import ModelConfig, init_params, sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def _boxed_state(cfg: ModelConfig, tx: optax.GradientTransformation, rng):
  """State whose leaves still carry logical-axis metadata (flax LogicallyPartitioned boxes)."""
  params = init_params(cfg, rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def _abstract_boxed_state(cfg: ModelConfig, tx):
  return jax.eval_shape(lambda: _boxed_state(cfg, tx, jax.random.key(0)))


def state_shardings(cfg: ModelConfig, tx, mesh: Mesh, rules=sharding.LOGICAL_AXIS_RULES):
  """NamedShardings for every leaf of the state, from the logical axes the model declares."""
  return sharding.tree_shardings(_abstract_boxed_state(cfg, tx), mesh, rules)


def abstract_state(cfg: ModelConfig, tx, mesh: Mesh, rules=sharding.LOGICAL_AXIS_RULES):
  """ShapeDtypeStructs with shardings: the target for restoring a checkpoint onto `mesh`."""
  return sharding.placed(nn.meta.unbox(_abstract_boxed_state(cfg, tx)),
                         state_shardings(cfg, tx, mesh, rules))


def init_state(cfg: ModelConfig, tx, mesh: Mesh, seed: int, params=None,
               rules=sharding.LOGICAL_AXIS_RULES) -> TrainState:
  """A fresh state, created directly in its sharded layout (no host ever holds the full model).

  With `params` given (e.g. from a pretraining checkpoint), they are used instead of a random init
  and the optimizer starts fresh.
  """
  shardings = state_shardings(cfg, tx, mesh, rules)
  if params is None:
    init = lambda rng: nn.meta.unbox(_boxed_state(cfg, tx, rng))
    return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
  params = jax.device_put(params, shardings.params)
  init = lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))
  return jax.jit(init, out_shardings=shardings, donate_argnums=0)(params)

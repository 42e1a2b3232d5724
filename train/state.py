"""The training state (step, params, optimizer state, with LoRA the frozen base, and for preference
tuning the frozen reference model) and how to create it already sharded."""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from model import ModelConfig, init_params, sharding
from model import lora as lora_lib
from model.lora import LoraConfig


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any     # what trains: every parameter, or with LoRA the adapters only
  opt_state: Any  # the optimizer's state, for `params` only
  # LoRA: the frozen base (no gradients, no optimizer state, sharded like `params` would be; never
  # saved with the state: checkpoints refer to it, see train/checkpoint.py). None without LoRA.
  frozen: Any = None
  # Preference tuning of every parameter with the reference model in the step: the starting
  # parameters, frozen (never saved either: checkpoints refer to init_from). None otherwise.
  reference: Any = None

  @property
  def model_params(self):
    """The model's whole parameter tree (`Transformer.apply`'s 'params')."""
    return self.params if self.frozen is None else lora_lib.join(self.frozen, self.params)

  @property
  def reference_params(self):
    """A preference objective's reference model: the frozen starting parameters, or with LoRA the
    base (run with the adapters off: no second copy of the weights). None without either."""
    return self.frozen if self.reference is None else self.reference


def _boxed_state(cfg: ModelConfig, tx: optax.GradientTransformation, rng, lora: LoraConfig,
                 reference: bool = False):
  """State whose leaves still carry logical-axis metadata (flax LogicallyPartitioned boxes)."""
  params = init_params(cfg, rng, lora)
  frozen = None
  if lora.enabled:
    params, frozen = lora_lib.split(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    frozen=frozen, reference=params if reference else None)


def _abstract_boxed_state(cfg: ModelConfig, tx, lora: LoraConfig, reference: bool = False):
  return jax.eval_shape(lambda: _boxed_state(cfg, tx, jax.random.key(0), lora, reference))


def state_shardings(cfg: ModelConfig, tx, mesh: Mesh, rules=sharding.LOGICAL_AXIS_RULES,
                    lora: LoraConfig = LoraConfig(), reference: bool = False):
  """NamedShardings for every leaf of the state, from the logical axes the model declares. With
  `reference`, the state holds a frozen copy of the parameters (TrainState.reference)."""
  return sharding.tree_shardings(_abstract_boxed_state(cfg, tx, lora, reference), mesh, rules)


def abstract_state(cfg: ModelConfig, tx, mesh: Mesh, rules=sharding.LOGICAL_AXIS_RULES,
                   lora: LoraConfig = LoraConfig(), reference: bool = False):
  """ShapeDtypeStructs with shardings: the target for restoring a checkpoint onto `mesh`."""
  return sharding.placed(nn.meta.unbox(_abstract_boxed_state(cfg, tx, lora, reference)),
                         state_shardings(cfg, tx, mesh, rules, lora, reference))


def init_state(cfg: ModelConfig, tx, mesh: Mesh, seed: int, params=None,
               rules=sharding.LOGICAL_AXIS_RULES, lora: LoraConfig = LoraConfig(),
               frozen=None, reference: bool = False) -> TrainState:
  """A fresh state, created directly in its sharded layout (no host ever holds the full model).

  With `params` given (e.g. from a pretraining checkpoint), they are used instead of a random init
  and the optimizer starts fresh. With LoRA, `params` are adapters (None: freshly initialised) and
  `frozen` the base (None: random too, e.g. for benchmarks). With `reference`, a frozen copy of the
  starting parameters goes into the state too.
  """
  if reference:
    state = init_state(cfg, tx, mesh, seed, params, rules, lora, frozen)
    copy = jax.tree.map(jnp.copy, state.params)  # not an alias: the step donates `params`
    return state.replace(reference=copy)
  shardings = state_shardings(cfg, tx, mesh, rules, lora)
  if frozen is not None:
    frozen = jax.device_put(frozen, shardings.frozen)
    if params is None:  # only the adapters' init is computed: the base's is unused and pruned
      params = jax.jit(lambda rng: lora_lib.split(nn.meta.unbox(init_params(cfg, rng, lora)))[0],
                       out_shardings=shardings.params)(jax.random.key(seed))
  if params is None:
    init = lambda rng: nn.meta.unbox(_boxed_state(cfg, tx, rng, lora))
    return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
  params = jax.device_put(params, shardings.params)
  init = lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))
  # The base is attached after the jit: passed through one, it would be copied.
  return jax.jit(init, out_shardings=shardings.replace(frozen=None), donate_argnums=0)(params).replace(
      frozen=frozen)

"""Where arrays live: the device mesh, the logical-axis rules, and the shardings derived from them.

The model names every axis of its weights and activations (model/transformer.py); this table maps the
names onto mesh axes, for training (train/) and for generation alike.
"""

import contextlib
import functools
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

# The one table mapping logical axis names (on parameters and activations, see model/transformer.py)
# to mesh axes. Parameters shard their `embed` axis over `fsdp` (ZeRO-3 style) and their head / mlp /
# vocab axes over `tensor` (Megatron style); activations shard the batch over `data` and `fsdp`.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_kv_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('vocab', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
    ('head_dim', None),
    ('layers', None),
    ('norm', None),
    ('lora_rank', None),     # LoRA adapters' inner axis (model/lora.py)
    ('quant_blocks', None),  # block scales of a quantized weight
)

BATCH_AXES = ('batch', 'length')


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves `-1` (at most one) so that the mesh covers every device; explains any mismatch."""
  sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
  bad = {a: s for a, s in sizes.items() if s == 0 or s < -1}
  if bad:
    raise ValueError(f'config.mesh: sizes must be positive or -1 (fill), got {bad}')
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ValueError(f'config.mesh: at most one axis may be -1, got {fill}')
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if num_devices % fixed:
      raise ValueError(f'config.mesh: the fixed axes {sizes} multiply to {fixed}, which does not '
                       f'divide the {num_devices} devices; cannot fill config.mesh.{fill[0]}')
    sizes[fill[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f'config.mesh: data*fsdp*tensor = {math.prod(sizes.values())} ({sizes}) but '
                     f'there are {num_devices} devices; set one axis to -1 to fill the rest')
  return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_config, len(devices))
  # jax.make_mesh orders devices to follow the physical interconnect (ICI rings on TPU).
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_to_sharding(logical_specs, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """Maps a pytree of logical PartitionSpecs to NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def tree_shardings(boxed_tree, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """NamedShardings for every leaf of a tree whose leaves carry logical axes (flax boxes)."""
  return logical_to_sharding(nn.get_partition_spec(boxed_tree), mesh, rules)


def placed(shapes, shardings):
  """ShapeDtypeStructs carrying their shardings: a target for restoring or compiling onto a mesh."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                      shardings)


def batch_sharding(mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> NamedSharding:
  return logical_to_sharding(P(*BATCH_AXES), mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def with_logical_rules(fn, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """Wraps `fn` so that the model's logical activation constraints resolve against `mesh` when traced."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return fn(*args, **kwargs)
  return wrapped


@contextlib.contextmanager
def activate(mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """The context of `with_logical_rules` for a block of code, e.g. generation outside a train step."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield

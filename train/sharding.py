"""Where arrays live: the device mesh, the logical-axis rules, and the shardings derived from them."""

import contextlib
import functools
import glob
import math
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
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


def process_batch_rows(sharding: NamedSharding, global_batch: int) -> tuple[int, int]:
  """The contiguous [start, stop) rows of the global batch that this process's devices hold.

  Processes that hold the same rows (e.g. when `tensor` spans hosts) get the same range and must be
  fed the same data; `data_shard(...)` turns this into a data-loader shard index.
  """
  indices = sharding.addressable_devices_indices_map((global_batch, 1))
  starts = sorted({(idx[0].start or 0, idx[0].stop or global_batch) for idx in indices.values()})
  start, stop = starts[0][0], starts[-1][1]
  covered = sum(b - a for a, b in starts)
  if covered != stop - start:
    raise ValueError(f'process {jax.process_index()} holds non-contiguous batch rows {starts}; '
                     'reorder the mesh so that each host owns a contiguous block of the batch')
  return start, stop


def data_shard(sharding: NamedSharding, global_batch: int) -> tuple[int, int, int]:
  """(shard_index, shard_count, local_batch) for this process's input pipeline."""
  start, stop = process_batch_rows(sharding, global_batch)
  local = stop - start
  return start // local, global_batch // local, local


def global_batch_from_local(local_batch: Mapping[str, np.ndarray], sharding: NamedSharding,
                            global_batch: int) -> dict[str, jax.Array]:
  """Assembles per-host numpy rows into global jax.Arrays sharded over the mesh."""
  return {
      k: jax.make_array_from_process_local_data(sharding, v, (global_batch,) + v.shape[1:])
      for k, v in local_batch.items()
  }


def maybe_initialize_distributed(coordinator_address: str = '', num_processes: int = 0,
                                 process_id: int = -1) -> bool:
  """Joins a multi-process JAX run when one is configured or detected. Returns whether it did.

  Explicit arguments win (any cluster, CPU included). Otherwise Cloud TPU VMs (found by their TPU
  device files; JAX then reads the slice's workers from the metadata server, and a single-host slice
  simply becomes one process), GKE TPU pods and SLURM jobs with several tasks are detected, and JAX
  fills in the details itself.
  """
  if jax.distributed.is_initialized():
    return True
  # CPU processes need a collectives backend to talk to each other; harmless on accelerators.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return True
  tpu_hosts = [h for h in os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]
  on_tpu_vm = bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))
  if on_tpu_vm or len(tpu_hosts) > 1 or int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    jax.distributed.initialize()
    return True
  return False


@contextlib.contextmanager
def activate(mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """Eager-mode counterpart of `with_logical_rules`, for code that calls the model outside a step."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield

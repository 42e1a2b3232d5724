"""Each process's share of the global batch: which rows it feeds, and how they become global arrays."""

from typing import Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding


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

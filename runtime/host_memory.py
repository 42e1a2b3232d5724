"""Makes the C allocator keep the memory XLA:CPU frees, so that every step does not fault it in anew.

XLA's CPU runtime allocates each execution's temporary buffer (340 MB for the tiny config's train step)
with malloc from a worker thread and frees it when the step ends. glibc serves a block that large from
a fresh mmap (a worker thread's arena cannot hold it) and unmaps it on free, so each step touches about
83k new pages, which the kernel zeroes one page fault at a time. With one arena, no mmap and no trimming,
the freed block is reused: the tiny train step goes from 83k page faults to none (docs/benchmarks.md).

The costs: freed memory is never returned to the system, and a step's temporary buffer alternates
between two places in the heap, so the process's peak resident memory grows by up to twice that buffer
(tiny: 1.4-1.7 GiB instead of 1.1; small: 4.9-6.9 GiB instead of 2.8-2.9); and compilation takes
about 20% longer, its threads now sharing one arena's lock. Worth it for training, which steps
thousands of times per compile; the tests, which compile far more than they step, set
FLAXLM_KEEP_FREED_MEMORY=0, which leaves glibc's defaults. Only where JAX computes on the CPU:
accelerator hosts do not run their steps out of malloc. Must run before JAX starts its CPU backend: a
thread picks its arena on its first allocation.
"""

import ctypes
import ctypes.util
import glob
import os

from absl import logging

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# Device nodes of TPUs (v4/v5e: accel, v5p/v6e: vfio), then of NVIDIA and AMD GPUs.
TPU_NODES = ('/dev/accel[0-9]*', '/dev/vfio/[0-9]*')
ACCELERATOR_NODES = TPU_NODES + ('/dev/nvidia[0-9]*', '/dev/kfd')


def has_device_node(patterns) -> bool:
  return any(glob.glob(pattern) for pattern in patterns)


def computes_on_cpu() -> bool:
  """Whether JAX will compute on the CPU, decided without starting a backend: the first platform of
  JAX_PLATFORMS when set, otherwise the absence of any accelerator device on this machine."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  return not has_device_node(ACCELERATOR_NODES)


def keep_freed_memory() -> bool:
  """On a CPU-computing host with glibc: one malloc arena, no mmap, no trimming. Returns whether the
  allocator was changed. Freed memory then stays with the process for reuse: its resident size stays
  at its peak rather than falling between steps."""
  if os.environ.get('FLAXLM_KEEP_FREED_MEMORY', '1') == '0' or not computes_on_cpu():
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c'))
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement  (glibc only: others' mallopt differ)
    mallopt = libc.mallopt
  except (OSError, AttributeError, TypeError):
    return False
  # -1: never trim (malloc.h); 0: no mmap'd blocks; 1: every thread allocates from the main arena.
  changed = (mallopt(_M_ARENA_MAX, 1) == 1 and mallopt(_M_MMAP_MAX, 0) == 1 and
             mallopt(_M_TRIM_THRESHOLD, -1) == 1)
  if changed:
    logging.info('CPU host: malloc keeps freed memory for reuse (one arena, no mmap, no trimming)')
  return changed

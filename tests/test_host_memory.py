"""runtime/host_memory.py: XLA:CPU's per-execution buffers stop being page-faulted in at every call."""

import fnmatch
import json
import sys
import textwrap

import pytest

from runtime import host_memory
from tests.cli import run_python

pytestmark = pytest.mark.unit

# A fresh interpreter (the allocator must be set before JAX starts) runs a function whose 256 MiB
# intermediate (the [8192, 8192] float32 tanh(a @ w), kept whole for its gradient) is XLA's temporary
# buffer, and counts page faults per call. Not one fusion's own scratch memory: XLA:CPU's YNNPACK
# fusions keep theirs between calls from jax 0.12 on, which would hide the problem. With malloc tuned,
# the buffer settles into one of two places within a few calls, so the least of 9 calls is compared.
_PROBE = textwrap.dedent("""
    import json, resource, sys
    from runtime import host_memory
    changed = host_memory.keep_freed_memory() if sys.argv[1] == 'keep' else False
    import jax, jax.numpy as jnp
    a = jnp.ones((8192, 32), jnp.float32) / 32
    w = jnp.ones((32, 8192), jnp.float32) / 32
    f = jax.jit(jax.grad(lambda w, a: jnp.sum(jnp.tanh(a @ w)))).lower(w, a).compile()
    faults = []
    for _ in range(10):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      f(w, a).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({'changed': changed, 'faults_per_call': min(faults[1:]), 'faults': faults}))
""")


def _probe(mode):
  # One CPU device, and the function compiled there (not loaded from the session's compilation cache).
  proc = run_python('-c', _PROBE, mode, XLA_FLAGS=None, FLAXLM_KEEP_FREED_MEMORY='1',
                    JAX_COMPILATION_CACHE_DIR='')
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc tuning is Linux-only')
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
  default, kept = _probe('default'), _probe('keep')
  pages = 8192 * 8192 * 4 // 4096
  # Without it every call faults in (nearly) the whole intermediate again: the problem being solved.
  assert default['faults_per_call'] > pages / 2, default
  assert kept['changed'], kept
  assert kept['faults_per_call'] < pages / 100, kept


@pytest.mark.parametrize('platforms,devices,expected', [
    ('cpu', [], True), ('cpu,tpu', ['/dev/accel0'], True), ('tpu,cpu', [], False), ('cuda', [], False),
    ('', [], True), ('', ['/dev/accel0'], False), ('', ['/dev/vfio/0'], False),
    ('', ['/dev/nvidia0'], False)])
def test_only_hosts_that_compute_on_cpu(monkeypatch, platforms, devices, expected):
  monkeypatch.setenv('JAX_PLATFORMS', platforms)
  monkeypatch.setenv('FLAXLM_KEEP_FREED_MEMORY', '1')
  monkeypatch.setattr(host_memory.glob, 'glob',
                      lambda pattern: fnmatch.filter(devices, pattern))
  assert host_memory.computes_on_cpu() == expected
  if not expected:
    assert not host_memory.keep_freed_memory()  # and leaves the allocator alone


def test_opt_out(monkeypatch):
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('FLAXLM_KEEP_FREED_MEMORY', '0')
  assert not host_memory.keep_freed_memory()

"""Test setup: 8 fake CPU devices and one compilation cache (set before JAX starts), the test tiers,
and what several modules share, made once per session: the demo data and a trained micro checkpoint."""

import atexit
import importlib.util
import os
import shutil
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Entry points run as subprocesses keep glibc's allocator defaults: tests compile far more than they
# step (runtime/host_memory.py).
os.environ.setdefault('FLAXLM_KEEP_FREED_MEMORY', '0')
# One persistent compilation cache for the session, shared by this process and every command it runs
# (they inherit the environment). The suite compiles the same few micro-model programs over and over:
# a resumed run what its straight twin compiled, each process of a command what the last one did.
# From the cache XLA's executable is loaded instead, the very same one, so every number stays bit
# for bit what a compile gives. Programs that compile in under a quarter second are not worth a file.
# JAX_COMPILATION_CACHE_DIR set beforehand is used as it is: a folder kept across sessions (`bash
# scripts/test.sh quick` keeps .jax-cache/), or '' for no cache.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='flaxlm-tests-jax-cache-')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.25')
if importlib.util.find_spec('filelock'):
  # A size limit makes JAX lock the cache folder around each read and write: processes that compile
  # the same program at once (the two processes of a multi-host test) then never read a half-written
  # entry. No eviction in practice: a session writes tens of MB.
  os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(8 << 30))

import pytest  # pylint: disable=wrong-import-position

# The tiers: pytest.ini's markers but `slow`. Every test module marks its tests with one or more in a
# module-level `pytestmark` (tests/test_markers.py checks it); a test that carries a tier mark of its
# own is of that tier instead of its module's (test_sft.py is unit, its training runs are e2e).
SPEED = 'slow'


def tiers(config) -> list[str]:
  """The tier marks pytest.ini declares: unit, e2e, parity."""
  return [line.split(':')[0].strip() for line in config.getini('markers')
          if line.split(':')[0].strip() != SPEED]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  """Moves each module's tier marks onto those of its tests that have none of their own, before -m
  selects."""
  names, module_tiers = tiers(config), {}
  for item in items:
    chain = item.listchain()
    module = next((node for node in chain if isinstance(node, pytest.Module)), None)
    if module is None:
      continue
    if module not in module_tiers:
      module_tiers[module] = [m for m in module.own_markers if m.name in names]
      module.own_markers[:] = [m for m in module.own_markers if m.name not in names]
    below = chain[chain.index(module) + 1:]
    if not any(m.name in names for node in below for m in node.own_markers):
      for mark in module_tiers[module]:
        item.own_markers.append(mark)
        item.keywords[mark.name] = mark


@pytest.fixture(scope='session')
def demo_data(tmp_path_factory):
  """The demo corpus and a small tokenizer trained on it: {'train', 'eval', 'tokenizer', 'dir'}."""
  from data import demo_corpus, sources, tokenizer  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp('demo')
  demo_corpus.write_corpus(str(root / 'data'))
  train, evaluation = str(root / 'data' / 'train.jsonl'), str(root / 'data' / 'eval.jsonl')
  model = str(root / 'tokenizer.model')
  tokenizer.train_sentencepiece(sources.iter_texts_python([train], 'jsonl'), model, vocab_size=512)
  return {'train': train, 'eval': evaluation, 'tokenizer': model, 'dir': str(root)}


@pytest.fixture(scope='session')
def micro_checkpoint(tmp_path_factory):
  """A workdir holding the micro model (tests/builders.py: float32, unrolled layers as configs/tiny.py
  has them) after 2 steps of pretraining on synthetic data, its checkpoint at step 2: a trained model
  to start instruction or preference tuning from (init_from). Shared by every module: never write into
  it (copy it first)."""
  from data.synthetic import SyntheticData  # pylint: disable=import-outside-toplevel
  from tests.builders import run_config  # pylint: disable=import-outside-toplevel
  from train import loop  # pylint: disable=import-outside-toplevel
  c = run_config('tiny', data=dict(format='synthetic'), train=dict(steps=2, seq_len=128),
                 checkpoint=dict(async_save=False, every_steps=2))
  workdir = str(tmp_path_factory.mktemp('micro_checkpoint'))
  loop.train(c, workdir, SyntheticData(c.data.seed, c.train.seq_len, c.model.vocab_size))
  return workdir

"""Test setup: 8 fake CPU devices (set before JAX starts), and shared demo data made once per session."""

import os
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Entry points run as subprocesses keep glibc's allocator defaults: tests compile far more than they
# step (runtime/host_memory.py).
os.environ.setdefault('FLAXLM_KEEP_FREED_MEMORY', '0')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pytest  # pylint: disable=wrong-import-position


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

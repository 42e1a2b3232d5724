"""The benchmarks run and report what they claim; layer scan keeps the program size flat in depth."""

import jax
import jax.numpy as jnp
import pytest

from data import benchmark as data_benchmark
from model import Transformer
from tests.builders import micro_model_config, run_config
from train import benchmark

pytestmark = pytest.mark.unit


def _micro_config():
  return run_config('tiny', model=dict(vocab_size=256), train=dict(seq_len=64),
                    mesh=dict(data=1, fsdp=-1, tensor=1))


def test_train_benchmark_reports_throughput_and_mfu(monkeypatch):
  monkeypatch.setattr(benchmark, 'measure_matmul_tflops', lambda dtype: 0.05)  # keep the test fast
  r = benchmark.benchmark(_micro_config(), steps=2, warmup=1)
  assert r['devices'] == jax.device_count() and r['batch_size'] == 8
  tokens = 8 * 64
  assert r['tokens_per_s_per_device'] == pytest.approx(tokens / (r['step_ms'] / 1000) / r['devices'])
  assert r['tflops_per_device'] > 0 and r['compile_s'] > 0
  assert r['mfu'] == pytest.approx(r['tflops_per_device'] / 0.05)
  assert r['temp_gib'] > 0 and r['host_peak_rss_gib'] > 0
  text = benchmark.format_result(r, 'micro')
  assert "this machine's measured matmul rate" in text and 'compile time' in text


def test_loglikelihood_benchmark_reports_tokens_per_second():
  r = benchmark.benchmark_loglikelihood(_micro_config(), calls=1)  # 8 devices: batch sharded 8 ways
  assert r['loglikelihood_tokens_per_s'] == pytest.approx(4 * 8 * 64 / r['loglikelihood_call_s'])
  assert r['loglikelihood_first_call_s'] > 0


def test_compile_only_reports_compile_time_and_memory_without_stepping():
  r = benchmark.benchmark(_micro_config(), steps=0)
  assert r['compile_s'] > 0 and r['temp_gib'] > 0 and r['n_layers'] == 2
  assert 'step_ms' not in r and 'mfu' not in r
  text = benchmark.format_result(r, 'micro')
  assert 'compile time' in text and 'step time' not in text


def test_matmul_rate_is_measured():
  assert 1e-4 < benchmark.measure_matmul_tflops('float32', n=256, repeats=2) < 1e3


def _hlo_size(n_layers):
  cfg = micro_model_config(vocab_size=256, n_layers=n_layers, max_seq_len=64)
  model = Transformer(cfg)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  tokens = jnp.zeros((2, 64), jnp.int32)
  grad = jax.grad(lambda p: jnp.mean(model.apply(p, tokens)))
  return len(jax.jit(grad).lower(params).as_text())


def test_scanned_program_does_not_grow_with_depth():
  """Why 32 layers compile about as fast as 4 (docs/benchmarks.md has the measured times)."""
  assert _hlo_size(32) < 1.05 * _hlo_size(4)


@pytest.mark.parametrize('fmt', ['jsonl', 'parquet'])
def test_data_benchmark_measures_the_pretraining_pipeline(demo_data, tmp_path, fmt):
  files = demo_data['train']
  if fmt == 'parquet':
    files = data_benchmark.write_parquet(files, str(tmp_path / 'train.parquet'))
  r = data_benchmark.benchmark_pretraining(files, demo_data['tokenizer'], seq_len=256, batch=4,
                                           seconds=1.0, fmt=fmt)
  assert r['batches'] > 0 and r['tokens_per_s'] > 0
  assert r['fill'] == pytest.approx(1.0)  # pretraining rows are packed full

"""The decoding benchmark runs and reports what it claims: our step against its roofline and against
transformers' generate on the same imported weights, whose greedy tokens ours equal."""

import jax
import pytest

from model import ModelConfig
from model.transformer import abstract_params
from train import decode_benchmark

pytestmark = [pytest.mark.parity, pytest.mark.slow]

pytest.importorskip('torch', reason='torch is not installed (the newest-releases CI set has no CPU '
                    'build of it for Python 3.12)')

CFG = ModelConfig(vocab_size=256, embed_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                  mlp_dim=128, dtype='float32', max_seq_len=64, scan_layers=False)


def test_decode_benchmark_compares_with_transformers():
  r = decode_benchmark.benchmark(CFG, batch=2, prompt_len=8, new_tokens=16, pairs=1,
                                 compare_torch=True, torch_threads=1, name='micro')
  assert r['greedy_rows_equal'] == 1.0  # the same weights decode to the same tokens
  for side in ('ours', 'transformers'):
    assert r[side]['step_ms'] != 0 and r[side]['call_s'] > 0
    assert r[side]['roofline_fraction'] == pytest.approx(r['roofline_ms'] / r[side]['step_ms'])
  assert r['speedup'] == pytest.approx(r['transformers']['step_ms'] / r['ours']['step_ms'])
  assert r['matmul_tflops'] > 0 and r['memory_gbps'] > 0 and r['bound'] in ('compute', 'memory')
  text = decode_benchmark.format_result(r)
  assert 'micro batch 2' in text and 'of roofline' in text and 'ours / transformers' in text


def test_roofline_counts_the_weights_read_and_the_filled_cache():
  params = abstract_params(CFG)
  one = decode_benchmark.decode_roofline(CFG, params, 1, prompt_len=8, new_tokens=16)
  weights = sum(x.size for x in jax.tree.leaves(params) if x.ndim >= 2) - 256 * 64
  attention = 4 * 2 * 4 * 16 * (8 + 8)  # layers x heads x head_dim x slots filled on average
  assert one['flops'] == 2 * weights + attention
  cache = 2 * 2 * 2 * 16 * (8 + 8) * 4
  assert one['bytes'] == 4 * (weights + 64) + cache + 4 * 256
  two = decode_benchmark.decode_roofline(CFG, params, 2, prompt_len=8, new_tokens=16)
  assert two['flops'] == 2 * one['flops'] and two['bytes'] - one['bytes'] == 4 * 64 + cache + 4 * 256

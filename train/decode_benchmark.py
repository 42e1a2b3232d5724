"""Times decoding: the sampler's step against its roofline on this machine, and against transformers'
`generate` on the same weights.

  python -m train.decode_benchmark --preset=tiny,small --batch=1,8,64 --compare-torch

For each preset and batch size: a random model (a transformers LlamaForCausalLM imported through
model/weights/hf.py with --compare-torch, so that both sides hold the same weights), prompts of
--prompt-len random tokens, and greedy decoding of exactly --new-tokens tokens (no stop token can
occur). A decoding step's time is (time for N new tokens - time for 1) / (N - 1): prefill excluded; each
time the median of as many calls as fit in 0.2 s (at least one). Our sampler and transformers run
alternately, --pairs times, and the medians are reported, so that a machine shared with other work
slows both alike.

The roofline of a step: max(its matmul FLOPs / this machine's measured matmul rate, the bytes it must
read / this machine's measured read rate for that many bytes), where the bytes are the weights (the
embedding table only for the batch's rows) and the key/value cache filled so far, on average over the
steps. Both rates are measured between the pairs too. Runs on one device: leave XLA_FLAGS unset.
transformers runs with torch's threads (--torch-threads to change them): on a loaded machine its
OpenMP threads spin against each other, and one thread may be faster.
"""

import json
import statistics
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import runtime
from model.config import DTYPES, preset
from model.inference.sampler import Sampler, SamplingConfig
from model.transformer import init_params
from model.weights import hf
from train.benchmark import measure_matmul_tflops

FLAGS = flags.FLAGS  # defined by define_flags() when run as a program


def measure_memory_gbps(nbytes: float = 2 ** 29, repeats: int = 5) -> float:
  """This machine's read rate for a working set of `nbytes`: a sum over a float32 array that size
  (best of `repeats`), from whichever level of the memory hierarchy holds it."""
  x = jnp.ones((max(int(nbytes) // 4, 2 ** 18),), jnp.float32)
  total = jax.jit(jnp.sum)
  jax.block_until_ready(total(x))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(total(x))
    best = min(best, time.perf_counter() - start)
  return x.nbytes / best / 1e9


def decode_roofline(cfg, params, batch: int, prompt_len: int, new_tokens: int) -> dict[str, float]:
  """FLOPs and bytes read of one decoding step, averaged over the steps of a completion."""
  itemsize = DTYPES[cfg.dtype].itemsize
  weights = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
                if x.ndim >= 2 and (cfg.tie_embeddings or 'token_embed' not in jax.tree_util.keystr(path)))
  filled = prompt_len + new_tokens / 2  # slots attended to, on average over steps 1 .. N - 1
  attention_flops = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * filled  # scores and values
  cache = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * filled
  return {'flops': batch * (2 * weights + attention_flops),
          'bytes': itemsize * (weights + batch * (cfg.embed_dim + cache)) + 4 * batch * cfg.vocab_size}


def _random_hf_model(cfg, seed: int):
  """A transformers model of `cfg`'s shape, random weights large enough for clear greedy choices."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  hf_config = hf.config_to_hf(cfg, 'llama', 'float32')
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{
      k: v for k, v in hf_config.items() if k not in ('architectures', 'model_type', 'torch_dtype')}))
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(1 + 0.1 * torch.randn_like(p) if 'norm' in name else 0.1 * torch.randn_like(p))
  return model.eval()


def _import(model, cfg):
  """The transformers model's weights in our layout, through model/weights/hf.py."""
  with tempfile.TemporaryDirectory() as folder:
    model.save_pretrained(folder)
    params = hf.load_hf_params(folder, cfg, DTYPES[cfg.param_dtype], log=None)
  if not cfg.scan_layers:
    params = hf.unstack_layers(params, cfg.n_layers)
  return jax.tree.map(jnp.asarray, params)


def _median_call(run, budget_s: float = 0.2, most: int = 10) -> float:
  """The median time of `run()` over as many calls as fit in `budget_s` (at least one)."""
  times = []
  while not times or (sum(times) < budget_s and len(times) < most):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def benchmark(cfg, batch: int, prompt_len: int = 32, new_tokens: int = 128, pairs: int = 3,
              compare_torch: bool = False, torch_threads: int = 0, seed: int = 0, name: str = '') -> dict:
  """The figures of one model config (its dtype: the compute and parameter dtype) and batch size."""
  if compare_torch:
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    transformers.utils.logging.disable_progress_bar()
    if torch_threads:
      torch.set_num_threads(torch_threads)
    hf_model = _random_hf_model(cfg, seed)
    params = _import(hf_model, cfg)
  else:
    params = nn.meta.unbox(jax.jit(lambda: init_params(cfg, jax.random.key(seed)))())
  rng = np.random.default_rng(seed)
  prompts = rng.integers(1, cfg.vocab_size, (batch, prompt_len)).tolist()
  stop = [cfg.vocab_size]  # no token has this id: every row runs the whole completion
  sampler = Sampler(cfg)
  configs = {n: SamplingConfig(max_new_tokens=n) for n in (1, new_tokens)}
  compile_s = sum(sampler.compile(params, prompts, s, stop) for s in configs.values())

  def ours(n):
    return jax.block_until_ready(sampler.sample(params, prompts, configs[n], stop))

  runs = {'ours': ours}
  if compare_torch:
    input_ids = torch.tensor(prompts)

    def theirs(n):
      with torch.no_grad():
        return hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                 max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

    runs['transformers'] = theirs
  for run in runs.values():  # warm up
    run(1)
    run(new_tokens)
  roof = decode_roofline(cfg, params, batch, prompt_len, new_tokens)
  times = {side: {1: [], new_tokens: []} for side in runs}
  rates = {'tflops': [], 'gbps': []}
  for _ in range(pairs):
    for side, run in runs.items():
      for n in (1, new_tokens):
        times[side][n].append(_median_call(lambda run=run, n=n: run(n)))
    rates['tflops'].append(measure_matmul_tflops(cfg.dtype, n=1024, repeats=3))
    rates['gbps'].append(measure_memory_gbps(roof['bytes'], repeats=3))

  tflops, gbps = statistics.median(rates['tflops']), statistics.median(rates['gbps'])
  roof_s = max(roof['flops'] / (tflops * 1e12), roof['bytes'] / (gbps * 1e9))
  result = {'model': name, 'dtype': cfg.dtype, 'batch': batch, 'prompt_len': prompt_len,
            'new_tokens': new_tokens, 'pairs': pairs, 'scan_layers': cfg.scan_layers, 'compile_s': compile_s,
            'matmul_tflops': tflops, 'memory_gbps': gbps, 'roofline_ms': 1000 * roof_s,
            'bound': 'compute' if roof['flops'] / (tflops * 1e12) >= roof['bytes'] / (gbps * 1e9)
                     else 'memory', **roof}
  if compare_torch:
    result['torch_threads'] = torch.get_num_threads()
  for side, side_times in times.items():
    steps = [(t_n - t_1) / (new_tokens - 1) for t_1, t_n in zip(side_times[1], side_times[new_tokens])]
    step_s = statistics.median(steps)
    result[side] = {'step_ms': 1000 * step_s, 'decode_tokens_per_s': batch / step_s,
                    'call_s': statistics.median(side_times[new_tokens]),
                    'roofline_fraction': roof_s / step_s}
  if compare_torch:
    result['speedup'] = result['transformers']['step_ms'] / result['ours']['step_ms']
    ours_tokens = np.asarray(ours(new_tokens).tokens)
    their_tokens = theirs(new_tokens)[:, prompt_len:].numpy()
    result['greedy_rows_equal'] = float(np.mean(np.all(ours_tokens == their_tokens, axis=1)))
  return result


def format_result(r: dict) -> str:
  head = (f"{r['model']} batch {r['batch']}, prompt {r['prompt_len']} + {r['new_tokens']} new tokens "
          f"({r['dtype']}, {'scanned' if r['scan_layers'] else 'unrolled'} layers): roofline "
          f"{r['roofline_ms']:.2f} ms/step ({r['bound']} bound: {r['flops'] / 1e9:.3f} GFLOP, "
          f"{r['bytes'] / 1e6:.1f} MB at {1000 * r['matmul_tflops']:.0f} GFLOP/s, "
          f"{r['memory_gbps']:.1f} GB/s measured)")
  lines = [head]
  for side in ('ours', 'transformers'):
    if side in r:
      x = r[side]
      lines.append(f"  {side:13s} {x['step_ms']:8.2f} ms/step  {x['decode_tokens_per_s']:9.0f} tokens/s  "
                   f"{100 * x['roofline_fraction']:5.1f}% of roofline  (call {x['call_s']:.2f} s)")
  if 'speedup' in r:
    lines.append(f"  ours / transformers: {r['speedup']:.2f}x decode tokens/s ({r['torch_threads']} torch "
                 f"thread(s)); greedy rows equal: {100 * r['greedy_rows_equal']:.0f}%")
  return '\n'.join(lines)


def main(argv):
  runtime.no_positional_arguments(argv)
  runtime.check_output_file('json', FLAGS.json)
  runtime.setup()
  results = []
  for name in FLAGS.preset:
    cfg = preset(name, dtype='float32', param_dtype='float32', scan_layers=FLAGS.scan_layers)
    for batch in FLAGS.batch:
      r = benchmark(cfg, int(batch), FLAGS.prompt_len, FLAGS.new_tokens, FLAGS.pairs,
                    FLAGS.compare_torch, FLAGS.torch_threads, name=name)
      print(format_result(r), flush=True)
      results.append(r)
  if FLAGS.json:
    with open(FLAGS.json, 'w', encoding='utf-8') as f:
      json.dump(results, f, indent=2)


def define_flags():
  flags.DEFINE_list('preset', ['tiny', 'small'], 'Model presets (model/config.py).')
  flags.DEFINE_list('batch', ['1', '8', '64'], 'Batch sizes.')
  flags.DEFINE_integer('prompt_len', 32, 'Prompt tokens per row.', lower_bound=1)
  flags.DEFINE_integer('new_tokens', 128, 'Tokens generated per row.', lower_bound=2)
  flags.DEFINE_integer('pairs', 3, 'Alternations of the timed runs (medians reported).', lower_bound=1)
  flags.DEFINE_bool('compare_torch', False, "Also time transformers' generate on the same weights "
                    '(needs torch and transformers).')
  flags.DEFINE_bool('scan_layers', False, 'Scan over layers (the presets\' default) rather than unroll '
                    'them, as configs/tiny.py does on CPU.')
  flags.DEFINE_integer('torch_threads', 0, "torch's intra-op threads (0: torch's default).",
                       lower_bound=0)
  flags.DEFINE_string('json', '', 'Also write the results to this JSON file.')
  runtime.dashed_aliases(['prompt_len', 'new_tokens', 'compare_torch', 'scan_layers', 'torch_threads'])


if __name__ == '__main__':
  define_flags()
  runtime.run(main)

"""Times the real train step on synthetic batches: step time, throughput, MFU, compile time, memory.

  python -m train.benchmark --config=configs/tiny.py [--steps 20] [--config.train.batch_size=32 ...]
  python -m train.benchmark --config=configs/small.py --steps 0 --config.model.n_layers=32  # compile
  python -m train.benchmark --config=configs/tiny.py --loglikelihood  # and lm-eval's scoring path
  python -m train.checkpoint benchmark [--gib 1]   # checkpoint checksums: `checksums` below

The step is `Run(config).train_step()`, exactly what `train.pretrain` runs (for a preference config,
what `train.dpo` runs, on synthetic pairs), fed with device-resident synthetic batches (numpy only, no
TensorFlow), so the figures measure the step and nothing else.
MFU counts model FLOPs as MaxText does (train/metrics.py) against the chip's peak bf16 rate; on CPU,
which has no published peak, against this machine's own measured matmul rate in the model's dtype.
"""

import functools
import hashlib
import json
import os
import resource
import statistics
import tempfile
import time
import zlib

import google_crc32c
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from etils import epath

from data.synthetic import synthetic_global_batch, synthetic_preference_batch
from model import ModelConfig, count_params
from model import attention as attention_lib
from model.config import PRESETS
from model.inference import scoring
from model.weights import checksums as checksums_lib
import runtime
from train import batches as batches_lib
from train import chips
from train import metrics as metrics_lib
from train import run as run_lib

FLAGS = flags.FLAGS  # defined by _define_flags() when run as a program


def measure_matmul_tflops(dtype='float32', n: int = 2048, repeats: int = 5) -> float:
  """This machine's sustained [n, n] x [n, n] matmul rate on the default device (best of `repeats`)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.dtype(dtype))
  # A chain of 4 dependent matmuls per call amortises the dispatch.
  chain = jax.jit(lambda a, b: ((((a @ b) @ b) @ b) @ b))
  jax.block_until_ready(chain(a, b))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(chain(a, b))
    best = min(best, time.perf_counter() - start)
  return 4 * 2 * n ** 3 / best / 1e12


def memory_summary(compiled) -> dict[str, float]:
  """Per-device bytes from the compiler (arguments, outputs, temporaries), and the runtime peak where
  the device reports one (accelerators), else this process's peak resident memory (CPU)."""
  out = {}
  analysis = compiled.memory_analysis()
  if analysis is not None:
    out['argument_gib'] = analysis.argument_size_in_bytes / 2 ** 30
    out['output_gib'] = analysis.output_size_in_bytes / 2 ** 30
    out['temp_gib'] = analysis.temp_size_in_bytes / 2 ** 30
    out['compiled_total_gib'] = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                                 - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes) / 2 ** 30
  stats = jax.devices()[0].memory_stats()
  if stats and 'peak_bytes_in_use' in stats:
    out['device_peak_gib'] = stats['peak_bytes_in_use'] / 2 ** 30
  else:
    out['host_peak_rss_gib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30
  return out


def benchmark(config, steps: int = 10, warmup: int = 2) -> dict[str, float]:
  run = run_lib.Run(config)
  tcfg, cfg = config.train, run.model_config
  state = run.init_state()  # random, base included (for LoRA too)
  # Two distinct device-resident batches, alternated, so that no host work is timed. Each process
  # feeds its own rows of them.
  shard, _, local = batches_lib.data_shard(run.batch_sharding, tcfg.batch_size)
  rows = slice(shard * local, (shard + 1) * local)
  # Preference tuning: synthetic pairs (with the reference's log-probabilities when they are
  # precomputed; else the step runs the reference model too).
  make = (functools.partial(synthetic_preference_batch, reference=run.precomputed_reference)
          if run.preference else synthetic_global_batch)
  batches = [run.global_batch({k: v[rows] for k, v in make(
      tcfg.seed, i, tcfg.batch_size, tcfg.seq_len, cfg.vocab_size).items()}) for i in range(2)]
  jax.block_until_ready(batches)

  start = time.perf_counter()
  lowered = run.train_step().lower(state, batches[0])
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start

  n_dev = jax.device_count()
  result = {'devices': n_dev, 'device_kind': jax.devices()[0].device_kind,
            'params': sum(x.size for x in jax.tree.leaves(state.params)),
            'batch_size': tcfg.batch_size, 'seq_len': tcfg.seq_len, 'n_layers': cfg.n_layers,
            'attention': attention_lib.resolve(cfg.attention, jax.default_backend(), cfg.dtype),
            'remat_policy': cfg.remat_policy,
            'lower_s': lower_s, 'compile_s': compile_s}
  if steps <= 0:  # compile only
    result.update(memory_summary(compiled))
    return result

  for i in range(warmup):
    state, metrics = compiled(state, batches[i % 2])
  jax.block_until_ready(state)
  times = []
  for i in range(steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batches[i % 2])
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t)
  loss = float(metrics['loss'])
  if not np.isfinite(loss):
    raise FloatingPointError(f'loss is {loss} after {warmup + steps} steps')

  step_s = statistics.median(times)
  tokens = tcfg.batch_size * tcfg.seq_len
  flops = metrics_lib.train_flops_per_token(cfg, tcfg.seq_len) * tokens
  result.update({
      'step_ms': 1000 * step_s, 'step_ms_min': 1000 * min(times),
      'tokens_per_s_per_device': tokens / step_s / n_dev,
      'tflops_per_device': flops / step_s / n_dev / 1e12, 'loss': loss,
  })
  peak = chips.peak_tflops()
  if peak:
    result['peak_tflops'] = peak
  elif jax.default_backend() == 'cpu':
    # Matmuls here run in the model's dtype, so that is the rate to compare against.
    peak = measure_matmul_tflops(cfg.dtype)
    result['measured_matmul_tflops'] = peak
  if peak:
    result['mfu'] = result['tflops_per_device'] / peak
  result.update(memory_summary(compiled))
  return result


def benchmark_loglikelihood(config, calls: int = 5) -> dict[str, float]:
  """Tokens/s of lm-eval's log-likelihood path (model/inference/scoring.py: the forward pass and the chunked
  log-softmax, host work included) on the step's model and mesh, for requests that fill rows of
  train.seq_len tokens, train.batch_size rows per batch, 4 batches per call; median of `calls`."""
  run = run_lib.Run(config)
  tcfg = config.train
  params = run.init_state().model_params  # random; with LoRA, the adapters joined with the base
  scorer = scoring.Scorer(run.model_config, params, run.mesh, batch_size=tcfg.batch_size,
                          max_length=tcfg.seq_len, lora=run.lora)
  tokens = np.random.default_rng(tcfg.seed).integers(
      0, run.model_config.vocab_size, (4 * scorer.batch_size, tcfg.seq_len + 1)).tolist()
  requests = [(row[:-8], row[-8:]) for row in tokens]  # 8 continuation tokens, as a short answer
  start = time.perf_counter()
  scorer.score(requests)
  first_s = time.perf_counter() - start
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    scorer.score(requests)
    times.append(time.perf_counter() - start)
  call_s = statistics.median(times)
  return {'loglikelihood_tokens_per_s': len(requests) * tcfg.seq_len / call_s,
          'loglikelihood_call_s': call_s, 'loglikelihood_first_call_s': first_s}


def format_result(r: dict[str, float], name: str = '') -> str:
  lines = [f"{name} on {r['devices']} x {r['device_kind']}: {r['params']:,} params, "
           f"{r['n_layers']} layers, batch {r['batch_size']} x {r['seq_len']}, attention "
           f"{r['attention']}, remat {r['remat_policy']}"]
  if 'step_ms' in r:
    lines += [f"  step time        {r['step_ms']:.1f} ms (median; min {r['step_ms_min']:.1f} ms)",
              f"  tokens/s/device  {r['tokens_per_s_per_device']:,.0f}",
              f"  model TFLOP/s    {r['tflops_per_device']:.4f} per device"]
  if 'mfu' in r:
    against = (f"{r['peak_tflops']:.0f} TFLOP/s peak" if 'peak_tflops' in r else
               f"this machine's measured matmul rate, {r['measured_matmul_tflops']:.4f} TFLOP/s")
    lines.append(f"  MFU              {100 * r['mfu']:.1f}% of {against}")
  lines.append(f"  compile time     {r['compile_s']:.2f} s (trace + lower {r['lower_s']:.2f} s)")
  if 'loglikelihood_tokens_per_s' in r:
    lines.append(f"  loglikelihood    {r['loglikelihood_tokens_per_s']:,.0f} tokens/s (lm-eval scoring, "
                 f"{r['batch_size']} x {r['seq_len']} per batch; first call with compilation "
                 f"{r['loglikelihood_first_call_s']:.1f} s)")
  mem = [f"{k[:-4]} {runtime.format_size(r[k] * 2 ** 30)}"
         for k in ('argument_gib', 'output_gib', 'temp_gib', 'compiled_total_gib', 'device_peak_gib',
                   'host_peak_rss_gib') if k in r]
  lines.append('  memory/device    ' + ', '.join(mem))
  return '\n'.join(lines)


# --------------------------------------------------------------------------------------------------
# Checkpoint checksums (`python -m train.checkpoint benchmark`)

def _rate(fn, data: bytes, repeat: int = 2) -> float:
  """Seconds per GiB of `fn` over `data`, in 8 MiB pieces as a checkpoint is read."""
  pieces = [data[i:i + (8 << 20)] for i in range(0, len(data), 8 << 20)]
  start = time.perf_counter()
  for _ in range(repeat):
    for piece in pieces:
      fn(piece)
  return (time.perf_counter() - start) / repeat / (len(data) / 2**30)


def checksums(gib: float, folder: str) -> list[str]:
  """Lines of figures: checksum candidates in memory, then the manifest written and checked on a
  file of `gib` GiB (read from the page cache), and what that means for a 7B training checkpoint."""
  sample = np.random.default_rng(0).integers(0, 256, 256 << 20, np.uint8).tobytes()
  candidates = {'crc32c (google-crc32c, used)': google_crc32c.value,
                'zlib.crc32': zlib.crc32,
                **{f'hashlib.{name}': (lambda name: lambda b: hashlib.new(name, b).digest())(name)
                   for name in ('md5', 'sha1', 'sha256', 'blake2b')}}
  try:
    import crc32c  # pylint: disable=import-outside-toplevel
    candidates['crc32c (the crc32c package)'] = crc32c.crc32c
  except ImportError:
    pass
  try:
    import xxhash  # pylint: disable=import-outside-toplevel
    candidates['xxh3_64 (xxhash)'] = xxhash.xxh3_64_digest
  except ImportError:
    pass
  lines = [f'{os.cpu_count()} CPU cores; in memory, one thread, 8 MiB pieces:']
  lines += [f'  {name:30s} {_rate(fn, sample):.3f} s/GiB' for name, fn in candidates.items()]
  with tempfile.TemporaryDirectory(dir=folder) as tmp:
    step = epath.Path(tmp) / '0'
    (step / 'state').mkdir(parents=True)
    with open(step / 'state' / 'data', 'wb') as f:
      for _ in range(max(1, round(gib * 4))):
        f.write(sample)
    size = (step / 'state' / 'data').stat().length / 2**30
    start = time.perf_counter()
    checksums_lib.write_manifest(step)
    write_s = (time.perf_counter() - start) / size
    start = time.perf_counter()
    if checksums_lib.check(step).status != 'ok':
      raise RuntimeError(f'{step} failed its own checksums while being timed')
    check_s = (time.perf_counter() - start) / size
  lines.append(f'A {size:.2f} GiB file from the page cache, {checksums_lib.WORKERS} threads: manifest '
               f'written at {write_s:.3f} s/GiB, checked at {check_s:.3f} s/GiB')
  params = count_params(ModelConfig(**PRESETS['llama2_7b']))
  state_gib = params * 12 / 2**30  # float32 parameters and both Adam moments
  lines.append(f'llama2_7b ({params / 1e9:.2f}B parameters): a training checkpoint (float32 parameters '
               f'+ Adam moments, {state_gib:.0f} GiB) takes {state_gib * write_s:.0f} s to checksum on '
               f'this machine (in the background), plus reading it from storage; its bfloat16 '
               f'parameters alone ({params * 2 / 2**30:.1f} GiB) {params * 2 / 2**30 * check_s:.0f} s')
  return lines



def main(argv):
  runtime.no_positional_arguments(argv)
  runtime.check_output_file('json', FLAGS.json)
  config = FLAGS.config
  runtime.setup(config.distributed)
  result = benchmark(config, FLAGS.steps, FLAGS.warmup)
  if FLAGS.loglikelihood:
    result.update(benchmark_loglikelihood(config))
  print(format_result(result, config.model.get('preset', 'model')))
  if FLAGS.json:
    with open(FLAGS.json, 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=2)


def define_flags():
  run_lib.define_flags(workdir=False)
  flags.DEFINE_integer('steps', 10, 'Timed steps (after the warmup steps); 0: compile only.',
                       lower_bound=0)
  flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.', lower_bound=0)
  flags.DEFINE_string('json', '', 'Also write the results to this JSON file.')
  flags.DEFINE_bool('loglikelihood', False, 'Also time lm-eval\'s log-likelihood path (forward only) '
                    'on the same model, batch and sequence length.')


if __name__ == '__main__':
  define_flags()
  runtime.run(main)

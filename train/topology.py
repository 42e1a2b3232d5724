"""TPU topologies from any machine: slice names -> compile-only devices, and the real train step
compiled for one, with the compiler's per-chip memory against the chip's HBM.

libtpu (requirements-tpu.txt) compiles for a TPU topology without a TPU: the mesh is built from the
topology's compile-only devices, the state and batch are ShapeDtypeStructs carrying their shardings,
and `Run(config, devices).train_step()` is lowered and compiled exactly as training would run it.
`python -m train.compile` is the command line; a process that compiles without a TPU sets
JAX_PLATFORMS=cpu itself (train/compile.py does) before JAX starts.
"""

import dataclasses
import importlib.util
import inspect
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from data.config import SFT_FORMATS
from model import attention as attention_lib
from model import sharding
from model.inference.sampler import Sampler, SamplingConfig
from train import chips
from train.run import Run

GIB = 2 ** 30


_ALIASES = {'v5litepod': 'v5e', 'v5': 'v5p', 'v6': 'v6e'}
# Chip grids of the standard slice sizes: 3D tori (v4, v5p) and 2D (v5e, v6e), by chip count.
_GRID_3D = {1: '1x1x1', 2: '1x2x1', 4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4',
            128: '4x4x8', 256: '4x8x8', 512: '8x8x8', 1024: '8x8x16', 2048: '8x16x16'}
_GRID_2D = {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16', 256: '16x16'}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str
  chip: chips.Chip
  grid: str                 # chips per dimension, e.g. '2x2x1'
  chips_per_host: tuple[int, int, int]

  @property
  def num_chips(self) -> int:
    return math.prod(int(x) for x in self.grid.split('x'))

  def devices(self):
    # Before libtpu loads: a machine that is not a TPU VM has no GCE metadata server to query, and
    # compiling takes no TPU, so several processes (tests, other compiles) may use libtpu at once.
    os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    desc = topologies.get_topology_desc(
        platform='tpu', topology_name=f'{self.chip.name}:{self.grid}',
        chip_config_name=self.chip.chip_config, chips_per_host_bounds=self.chips_per_host,
        num_slices=1, wrap=(False, False, False))
    return desc.devices


def parse_topology(name: str) -> Topology:
  """'v5p-8' (Cloud TPU slice names: TensorCores for v4/v5p, chips for v5e/v6e) or 'v5p:2x2x1'."""
  match = re.fullmatch(r'(v\d+[a-z]*)[-:]([\dx]+)', name.strip().lower())
  if not match:
    raise ValueError(f'Unknown topology {name!r}; expected e.g. v5p-8, v4-8, v5e-8, v6e-8 or v5p:2x2x1')
  generation, size = _ALIASES.get(match.group(1), match.group(1)), match.group(2)
  if generation not in chips.TPUS:
    raise ValueError(f'Unknown TPU generation in {name!r}; known: {sorted(chips.TPUS)}')
  chip = chips.TPUS[generation]
  grids = _GRID_3D if chip.cores_per_chip == 2 else _GRID_2D
  if 'x' in size:
    grid = size
  else:
    n_chips = int(size) // chip.cores_per_chip
    if n_chips not in grids or int(size) % chip.cores_per_chip:
      raise ValueError(f'No standard {generation} slice of size {size}; known: '
                       f'{[f"{generation}-{c * chip.cores_per_chip}" for c in grids]}')
    grid = grids[n_chips]
  dims = [int(x) for x in grid.split('x')] + [1] * (3 - len(grid.split('x')))
  per_host = tuple(min(d, h) for d, h in zip(dims, (2, 2, 1) if math.prod(dims) > 8 or
                                             chip.cores_per_chip == 2 else (2, 4, 1)))
  return Topology(name, chip, grid, per_host)


@dataclasses.dataclass
class Report:
  """What one compiled step needs per chip, in bytes."""
  name: str
  topology: Topology
  mesh: dict[str, int]
  batch_size: int
  seq_len: int
  remat_policy: str
  attention: str
  param_dtype: str
  state_dtype: str
  argument: int
  output: int
  alias: int
  temp: int
  code: int
  state: int          # params + optimizer state (+ a LoRA run's frozen base), this chip's shards
  compile_s: float
  trainable: int = 0  # parameters that get gradients (with LoRA: the adapters)
  lora: str = ''      # e.g. 'LoRA rank 16 on q,k,v,o,gate,up,down over an nf4 base' 
  custom_calls: tuple[str, ...] = ()  # e.g. tpu_custom_call: a Pallas kernel (splash attention)
  error: str = ''     # the compiler's own out-of-memory message, when it gave up

  @property
  def total(self) -> int:
    return self.argument + self.output - self.alias + self.temp + self.code

  @property
  def hbm(self) -> int:
    return int(self.topology.chip.hbm_gib * GIB)

  @property
  def fits(self) -> bool:
    return not self.error and self.total <= self.hbm

  def summary(self) -> str:
    per_chip = self.batch_size * self.seq_len / self.topology.num_chips
    head = (f'{self.name} on {self.topology.name} ({self.topology.num_chips} chips, '
            f'{self.topology.chip.hbm_gib:g} GiB HBM each): mesh {self.mesh}, batch {self.batch_size} x '
            f'{self.seq_len} ({per_chip:,.0f} tokens/chip), remat {self.remat_policy}, attention '
            f'{self.attention}, params {self.param_dtype}, optimizer state {self.state_dtype}, '
            f'{self.trainable:,} trainable parameters' + (f' ({self.lora})' if self.lora else '')
            + (f', custom calls {", ".join(self.custom_calls)}' if self.custom_calls else '') + '; '
            f'compiled in {self.compile_s:.0f} s')
    if self.error:
      return head + f'\n  does NOT fit: the compiler ran out of HBM:\n  {self.error}'
    g = lambda b: f'{b / GIB:.2f} GiB' if b >= GIB / 10 else f'{b / 2 ** 20:.1f} MiB'
    return (head + f'\n  per chip: arguments {g(self.argument)} (params + optimizer state '
            f'{g(self.state)}), outputs {g(self.output)} (aliased with arguments {g(self.alias)}), '
            f'temporaries {g(self.temp)}, code {g(self.code)}\n  total {g(self.total)} of '
            f'{g(self.hbm)} HBM ({100 * self.total / self.hbm:.0f}%): '
            + ('fits' if self.fits else 'does NOT fit'))


def _shard_bytes(tree) -> int:
  """Bytes of this chip's shards, sub-byte types (a QLoRA base's uint4 codes) packed as on TPU."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * jax.dtypes.itemsize_bits(x.dtype) // 8
             for x in jax.tree.leaves(tree))


def compile_step(config: Any, topology: Topology, name: str = 'train step') -> Report:
  """Lowers and compiles `Run(config).train_step()` for `topology`; returns its memory report."""
  run = Run(config, topology.devices())
  state, batch = run.abstract_state(), run.abstract_batch()
  cfg = run.model_config
  start = time.perf_counter()
  error = ''
  try:
    lowered = run.train_step().lower(state, batch)
    custom_calls = tuple(sorted(set(re.findall(r'custom_call @([\w.]+)', lowered.as_text()))))
    compiled = lowered.compile()
    mem = compiled.memory_analysis()
    sizes = (mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
             mem.temp_size_in_bytes, mem.generated_code_size_in_bytes)
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e) and 'out of memory' not in str(e).lower():
      raise
    error = str(e).strip().splitlines()[0][:2000]
    sizes, custom_calls = (0, 0, 0, 0, 0), ()
  with jax.sharding.use_abstract_mesh(run.mesh.abstract_mesh):
    attention = attention_lib.resolve(cfg.attention, 'tpu', cfg.dtype)
  lora = run.lora
  # Adam's moments are in the dtype of what trains: the parameters, or float32 LoRA adapters.
  state_dtype = (config.optimizer.get('state_dtype', '')
                 or ('float32' if lora.enabled else cfg.param_dtype))
  return Report(name, topology, dict(run.mesh.shape), config.train.batch_size, config.train.seq_len,
                cfg.remat_policy, attention, cfg.param_dtype, state_dtype, *sizes,
                state=_shard_bytes(state), compile_s=time.perf_counter() - start,
                custom_calls=custom_calls, error=error,
                trainable=sum(x.size for x in jax.tree.leaves(state.params)),
                lora=(f'LoRA rank {lora.rank} on {lora.targets} over a frozen '
                      f'{lora.base_dtype or cfg.param_dtype} base' if lora.enabled else ''))


def compile_rollout(config: Any, topology: Topology) -> Report:
  """Lowers and compiles train.grpo's rollout program (prefill and decoding of train.batch_size
  completions of grpo.max_completion_len tokens after prompts of grpo.max_prompt_len) for `topology`.
  The train state stays on the chips while it runs, so the report counts it as resident beside the
  program's own buffers."""
  run = Run(config, topology.devices())
  state, grpo, tcfg = run.abstract_state(), config.grpo, config.train
  sampler = Sampler(run.model_config, run.mesh, sharding.LOGICAL_AXIS_RULES, run.lora)
  shape = (tcfg.batch_size, -(-grpo.max_prompt_len // 16) * 16)  # train.grpo's padded prompts
  prompts = tuple(jax.ShapeDtypeStruct(shape, jnp.int32, sharding=run.batch_sharding) for _ in range(2))
  sampling = SamplingConfig(max_new_tokens=grpo.max_completion_len, temperature=grpo.temperature,
                            top_k=grpo.top_k, top_p=grpo.top_p, logprobs_temperature=grpo.temperature)
  cfg, start, error = run.model_config, time.perf_counter(), ''
  try:
    compiled = sampler.lower(state.model_params, prompts, sampling, stop_ids=(0,)).compile()
    mem = compiled.memory_analysis()
    sizes = (_shard_bytes(state), mem.output_size_in_bytes, 0, mem.temp_size_in_bytes,
             mem.generated_code_size_in_bytes)
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e) and 'out of memory' not in str(e).lower():
      raise
    error = str(e).strip().splitlines()[0][:2000]
    sizes = (0, 0, 0, 0, 0)
  lora = run.lora
  return Report('GRPO rollout', topology, dict(run.mesh.shape), tcfg.batch_size,
                shape[1] + grpo.max_completion_len, cfg.remat_policy, 'decode', cfg.param_dtype,
                config.optimizer.get('state_dtype', '') or ('float32' if lora.enabled else cfg.param_dtype),
                *sizes, state=_shard_bytes(state), compile_s=time.perf_counter() - start, error=error,
                trainable=sum(x.size for x in jax.tree.leaves(state.params)),
                lora=(f'LoRA rank {lora.rank} on {lora.targets} over a frozen '
                      f'{lora.base_dtype or cfg.param_dtype} base' if lora.enabled else ''))


def advice(report: Report, config: Any) -> str:
  """What to change when a step does not fit, most effective first."""
  cfg, tcfg, hbm = config.model, config.train, report.hbm
  tips = []
  if report.state > 0.6 * hbm:
    if report.mesh['data'] > 1 or report.mesh['tensor'] > 1:
      tips.append('shard the parameters and optimizer state over every chip: --config.mesh.data=1 '
                  '--config.mesh.fsdp=-1 --config.mesh.tensor=1')
    if not config.optimizer.get('state_dtype') and cfg.param_dtype == 'float32':
      tips.append('keep Adam\'s moments in bfloat16: --config.optimizer.state_dtype=bfloat16')
    if cfg.param_dtype == 'float32':
      tips.append('keep the parameters in bfloat16 too: --config.model.param_dtype=bfloat16 (no float32 '
                  'master copy: small updates can round away; prefer a bigger slice for pretraining)')
  if cfg.remat_policy != 'full':
    tips.append(f'recompute more of each layer in the backward pass: --config.model.remat_policy=full '
                f'(now {cfg.remat_policy!r})')
  per_device = tcfg.batch_size // (report.mesh['data'] * report.mesh['fsdp'])
  micro = per_device // max(tcfg.grad_accum_steps, 1)
  if micro > 1:
    tips.append(f'halve the activations per step with gradient accumulation: '
                f'--config.train.grad_accum_steps={tcfg.grad_accum_steps * 2} (same global batch), or '
                f'a smaller --config.train.batch_size')
  if tcfg.loss_chunk_len == 0 or tcfg.loss_chunk_len > 1024:
    tips.append('compute the loss in sequence chunks: --config.train.loss_chunk_len=512')
  tips.append('or use a larger slice (more chips share the state)')
  return '\n'.join(f'  - {t}' for t in tips)


def slice_tip(path: str, topology: Topology) -> str:
  """Points at the config file's own settings for this slice, when it has some and they are unused."""
  file, _, options = path.partition(':')
  slices = getattr(_config_module(file), 'SLICES', {})
  opts = [o for o in options.split(',') if o]
  if topology.name in slices and topology.name not in opts:
    suggested = ','.join([o for o in opts if o not in slices] + [topology.name])
    return f'  - the settings this config file has for {topology.name}: --config={file}:{suggested}\n'
  return ''


def _config_module(file: str):
  spec = importlib.util.spec_from_file_location(f'_config_{abs(hash(file))}', file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file, `path[:options]`, as ml_collections' config flags load it."""
  file, _, options = path.partition(':')
  module = _config_module(file)
  return module.get_config(options) if options else module.get_config()


def sft_variant(path: str) -> str | None:
  """`path` with its options plus 'sft', if its get_config takes options (and is not SFT or DPO
  already)."""
  file, _, options = path.partition(':')
  if (not inspect.signature(_config_module(file).get_config).parameters
      or {'sft', 'dpo'} & set(options.split(','))):
    return None
  return f'{file}:{",".join(filter(None, [options, "sft"]))}'


def step_name(config) -> str:
  if config.train.get('objective', 'lm') == 'dpo':
    where = 'precomputed' if config.dpo.reference == 'precompute' else 'in the step'
    return f'DPO step ({config.dpo.loss} loss, reference log-probabilities {where})'
  objective = config.train.get('objective', 'lm')
  if objective == 'grpo':
    return 'GRPO train step'
  return 'SFT step' if config.data.format in SFT_FORMATS else 'pretraining step'

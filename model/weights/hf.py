"""The Hugging Face format of LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM and
Qwen3ForCausalLM, and ours.

`config.json` <-> ModelConfig; the name and layout of every parameter; reading a model folder's
safetensors into our (scanned) layout, and our parameters out as HF tensors. Layouts: our rotary
embedding is the Hugging Face "rotate half" one, so q/k weights need no permutation; HF Linear weights
are [out, in], ours [in, ...heads...]. Memory stays flat: each stacked parameter [L, ...] is allocated
once and filled tensor by tensor, a block of rows at a time, and export streams the same way.
"""

import dataclasses
import functools
import json
import math
import os
import re
import time
from typing import Any, Iterator

import jax
import numpy as np
import tqdm

from model.config import ARCHITECTURE_FIELDS, PRESETS, ModelConfig
from model.weights import safetensors, untrusted

# --------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig

ARCHITECTURES = {'LlamaForCausalLM': 'llama', 'MistralForCausalLM': 'mistral',
                 'Qwen2ForCausalLM': 'qwen2', 'Qwen3ForCausalLM': 'qwen3'}
ARCH_CLASSES = {v: k for k, v in ARCHITECTURES.items()}
_TORCH_DTYPES = {'float32': 'float32', 'bfloat16': 'bfloat16', 'float16': 'float16',
                 'torch.float32': 'float32', 'torch.bfloat16': 'bfloat16', 'torch.float16': 'float16'}


def _rope(hf: untrusted.Fields) -> tuple[float, untrusted.Fields, str]:
  """(theta, scaling fields, their key) from either the transformers<5 keys (`rope_theta`,
  `rope_scaling`) or the transformers>=5 `rope_parameters`."""
  params, scaling = hf.mapping('rope_parameters'), hf.mapping('rope_scaling')
  theta = params.number('rope_theta', hf.number('rope_theta', 10000.0, positive=True), positive=True)
  merged = {**scaling.values, **{k: v for k, v in params.values.items() if k != 'rope_theta'}}
  key = 'rope_parameters' if params.values else 'rope_scaling'
  return theta, untrusted.Fields(merged, hf.where, key + '.'), key


def read_config(hf_dir: str, **overrides) -> tuple[ModelConfig, str, list[str]]:
  """config_from_hf of `hf_dir`/config.json, read as a file one did not make (model/weights/untrusted.py)."""
  path = os.path.join(hf_dir, 'config.json')
  return config_from_hf(untrusted.read_json(path), path, **overrides)


def config_from_hf(hf: dict, where: str = 'config.json', **overrides) -> tuple[ModelConfig, str, list[str]]:
  """(ModelConfig, architecture name, notes) from a parsed `config.json` (named `where` in errors).
  Unsupported features, and values of the wrong type, are errors naming the config.json key;
  `overrides` set ModelConfig fields (e.g. dtype)."""
  hf = untrusted.Fields(hf, where)
  archs = hf.strings('architectures')
  arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
  if arch is None:
    model_type = hf.get('model_type')
    arch = model_type if isinstance(model_type, str) and model_type in ARCH_CLASSES else None
  if arch is None:
    raise ValueError(f'{where}: architectures={archs} model_type={hf.get("model_type")!r}: only '
                     f'{sorted(ARCHITECTURES)} are supported')
  notes = []

  def unsupported(key, value, why):
    raise ValueError(f'{where}: {key}={value!r} is not supported: {why}')

  act = hf.string('hidden_act', 'silu')
  if act not in ('silu', 'swish'):
    unsupported('hidden_act', act, 'the MLP is SwiGLU (silu)')
  if hf.boolean('attention_bias', False):
    unsupported('attention_bias', True, 'biases on all of q/k/v/o; only the Qwen2 q/k/v bias is modelled')
  if hf.boolean('mlp_bias', False):
    unsupported('mlp_bias', True, 'the MLP has no biases')
  theta, scaling, rope_key = _rope(hf)
  rope_type = scaling.get('rope_type', scaling.get('type', 'default'))
  rope = {}
  if rope_type == 'llama3':
    rope = dict(rope_scaling_factor=scaling.number('factor', positive=True),
                rope_low_freq_factor=scaling.number('low_freq_factor', positive=True),
                rope_high_freq_factor=scaling.number('high_freq_factor', positive=True),
                rope_original_max_len=scaling.integer('original_max_position_embeddings'))
  elif rope_type != 'default':
    unsupported(f'{rope_key}.rope_type', rope_type, "supported rotary embeddings are 'default' and 'llama3'")

  embed, n_layers = hf.integer('hidden_size'), hf.integer('num_hidden_layers')
  heads = hf.integer('num_attention_heads')
  max_len = hf.integer('max_position_embeddings', 4096)
  # Sliding-window attention: our attention is full, which equals a sliding window of W exactly for
  # sequences of up to W tokens. So cap the sequence length there rather than compute something else.
  window = hf.integer('sliding_window', None) if hf.get('sliding_window') is not False else None
  if arch in ('qwen2', 'qwen3'):
    layer_types = hf.strings('layer_types')
    uses_window = hf.boolean('use_sliding_window', False) and (
        'sliding_attention' in layer_types if layer_types
        else hf.integer('max_window_layers', 0, minimum=0) < n_layers)
    window = window if uses_window else None
  elif arch == 'llama':
    window = None
  if window and window < max_len:
    notes.append(f'config.json sliding_window={window} < max_position_embeddings={max_len}: this model '
                 f'uses full attention, which is exact up to {window} tokens, so max_seq_len is set to '
                 f'{window}')
    max_len = window

  dtype = _TORCH_DTYPES.get(str(hf.get('torch_dtype') or hf.get('dtype') or 'float32'), 'float32')
  values = dict(
      vocab_size=hf.integer('vocab_size'), embed_dim=embed, n_layers=n_layers, n_heads=heads,
      n_kv_heads=hf.integer('num_key_value_heads', heads),
      head_dim=hf.integer('head_dim', embed // heads), mlp_dim=hf.integer('intermediate_size'),
      norm_eps=hf.number('rms_norm_eps', 1e-6, positive=True), rope_theta=theta, **rope,
      max_seq_len=max_len, qkv_bias=arch == 'qwen2', qk_norm=arch == 'qwen3',
      tie_embeddings=hf.boolean('tie_word_embeddings', False),
      init_std=hf.number('initializer_range', 0.02), dtype='bfloat16', param_dtype=dtype)
  values.update(overrides)
  try:
    return ModelConfig(**values), arch, notes
  except ValueError as e:  # e.g. heads not a multiple of the kv-heads
    raise ValueError(f'{where} describes no model this code can build: {e}') from None


def matching_preset(cfg: ModelConfig) -> tuple[str | None, str]:
  """(name, '') of the preset with the same shapes and numerics, else (None, how the closest differs)."""
  mine = {f: getattr(cfg, f) for f in ARCHITECTURE_FIELDS}
  best, best_diff = None, None
  for name, values in PRESETS.items():
    theirs = dataclasses.asdict(ModelConfig(**values))
    diff = {f: (mine[f], theirs[f]) for f in ARCHITECTURE_FIELDS if mine[f] != theirs[f]}
    if not diff:
      return name, ''
    if best_diff is None or len(diff) < len(best_diff):
      best, best_diff = name, diff
  return None, f'closest preset {best} differs in ' + ', '.join(
      f'{k} ({a} vs {b})' for k, (a, b) in best_diff.items())


def default_arch(cfg: ModelConfig) -> str:
  """The Hugging Face architecture that computes `cfg`: qwen3 for q/k norms, qwen2 for q/k/v biases,
  else llama (which equals mistral for full attention)."""
  return 'qwen3' if cfg.qk_norm else 'qwen2' if cfg.qkv_bias else 'llama'


def config_to_hf(cfg: ModelConfig, arch: str, dtype: str, bos_id: int | None = None,
                 eos_id: int | list[int] | None = None) -> dict:
  """config.json for `arch` (llama, mistral, qwen2 or qwen3) with the same function as `cfg`."""
  if arch not in ARCH_CLASSES:
    raise ValueError(f'--arch must be one of {sorted(ARCH_CLASSES)}, got {arch!r}')
  if (cfg.qkv_bias, cfg.qk_norm) != (arch == 'qwen2', arch == 'qwen3'):
    raise ValueError(f'model.qkv_bias={cfg.qkv_bias}, model.qk_norm={cfg.qk_norm}: --arch {arch} cannot '
                     f'represent this model (q/k/v biases are qwen2\'s, q/k norms qwen3\'s, and each '
                     f'requires its own); use --arch {default_arch(cfg)}')
  if arch == 'qwen2' and cfg.head_dim * cfg.n_heads != cfg.embed_dim:
    raise ValueError(f'qwen2 requires head_dim * n_heads == embed_dim, got {cfg.head_dim} * '
                     f'{cfg.n_heads} != {cfg.embed_dim}')
  hf = {
      'architectures': [ARCH_CLASSES[arch]], 'model_type': arch,
      'vocab_size': cfg.vocab_size, 'hidden_size': cfg.embed_dim, 'intermediate_size': cfg.mlp_dim,
      'num_hidden_layers': cfg.n_layers, 'num_attention_heads': cfg.n_heads,
      'num_key_value_heads': cfg.n_kv_heads, 'head_dim': cfg.head_dim, 'hidden_act': 'silu',
      'max_position_embeddings': cfg.max_seq_len, 'rms_norm_eps': cfg.norm_eps,
      'rope_theta': cfg.rope_theta, 'rope_scaling': None, 'tie_word_embeddings': cfg.tie_embeddings,
      'initializer_range': cfg.init_std, 'torch_dtype': dtype, 'use_cache': True,
      'bos_token_id': bos_id, 'eos_token_id': eos_id,
  }
  if cfg.rope_scaling_factor > 0:
    hf['rope_scaling'] = {'rope_type': 'llama3', 'factor': cfg.rope_scaling_factor,
                          'low_freq_factor': cfg.rope_low_freq_factor,
                          'high_freq_factor': cfg.rope_high_freq_factor,
                          'original_max_position_embeddings': cfg.rope_original_max_len}
  if arch == 'llama':
    hf.update(attention_bias=False, mlp_bias=False)
  elif arch == 'mistral':
    hf.update(sliding_window=None)
  else:
    if arch == 'qwen2':
      del hf['head_dim']  # derived from hidden_size / num_attention_heads
    else:
      hf.update(attention_bias=False)
    hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
  return hf


# --------------------------------------------------------------------------------------------------
# Parameter names and layouts

@dataclasses.dataclass(frozen=True)
class _Param:
  """One parameter. Every layout change is "maybe transpose HF's 2-D matrix, then reshape": e.g. HF
  q_proj.weight [N*H, D] -> transpose [D, N*H] -> ours [D, N, H]."""
  path: tuple[str, ...]           # ours, e.g. ('layers', 'attn', 'q_proj'); stacked over layers if layered
  hf_name: str                    # e.g. 'model.layers.{}.self_attn.q_proj.weight'
  hf_shape: tuple[int, ...]
  shape: tuple[int, ...]          # ours, for one layer
  transposed: bool = False

  @property
  def layered(self) -> bool:
    return '{}' in self.hf_name

  def as_hf(self, ours: np.ndarray) -> np.ndarray:
    """A view of our array as HF's matrix when not transposed, else as the transpose of HF's matrix."""
    return ours.reshape(self.hf_shape[::-1] if self.transposed else self.hf_shape)

  def row_blocks(self, max_bytes: int, itemsize: int) -> Iterator[slice]:
    """Slices of HF rows (axis 0) of at most ~max_bytes each, to convert big matrices piecewise."""
    rows = self.hf_shape[0]
    step = max(1, max_bytes // max(1, math.prod(self.hf_shape[1:]) * itemsize))
    return (slice(r, min(r + step, rows)) for r in range(0, rows, step))


def param_map(cfg: ModelConfig) -> list[_Param]:
  """Every parameter: our path, the HF tensor name and shape, and our shape."""
  d, n, k, h, f, v = (cfg.embed_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim,
                      cfg.vocab_size)
  layer = 'model.layers.{}.'
  attn, mlp = layer + 'self_attn.', layer + 'mlp.'
  out = [
      _Param(('token_embed',), 'model.embed_tokens.weight', (v, d), (v, d)),
      _Param(('final_norm', 'scale'), 'model.norm.weight', (d,), (d,)),
      _Param(('layers', 'attn_norm', 'scale'), layer + 'input_layernorm.weight', (d,), (d,)),
      _Param(('layers', 'mlp_norm', 'scale'), layer + 'post_attention_layernorm.weight', (d,), (d,)),
      _Param(('layers', 'attn', 'q_proj'), attn + 'q_proj.weight', (n * h, d), (d, n, h), True),
      _Param(('layers', 'attn', 'k_proj'), attn + 'k_proj.weight', (k * h, d), (d, k, h), True),
      _Param(('layers', 'attn', 'v_proj'), attn + 'v_proj.weight', (k * h, d), (d, k, h), True),
      _Param(('layers', 'attn', 'o_proj'), attn + 'o_proj.weight', (d, n * h), (n, h, d), True),
      _Param(('layers', 'mlp', 'gate_proj'), mlp + 'gate_proj.weight', (f, d), (d, f), True),
      _Param(('layers', 'mlp', 'up_proj'), mlp + 'up_proj.weight', (f, d), (d, f), True),
      _Param(('layers', 'mlp', 'down_proj'), mlp + 'down_proj.weight', (d, f), (f, d), True),
  ]
  if cfg.qk_norm:
    out += [_Param(('layers', 'attn', f'{x}_norm', 'scale'), attn + f'{x}_norm.weight', (h,), (h,))
            for x in ('q', 'k')]
  if cfg.qkv_bias:
    out += [_Param(('layers', 'attn', f'{x}_bias'), attn + f'{x}_proj.bias', (heads * h,), (heads, h))
            for x, heads in (('q', n), ('k', k), ('v', k))]
  if not cfg.tie_embeddings:
    out.append(_Param(('unembed',), 'lm_head.weight', (v, d), (d, v), True))
  return out


# HF tensors that carry no weights of the model (recomputed buffers).
_IGNORED = re.compile(r'.*rotary_emb\.inv_freq$')
_LAYER = re.compile(r'model\.layers\.(\d{1,9})\.')


# Big matrices are converted in blocks of HF rows of about this size, so that no full-size temporary
# exists besides the destination.
_BLOCK_BYTES = 64 * 2**20


def _our_shape(p: _Param, cfg: ModelConfig) -> tuple[int, ...]:
  return (cfg.n_layers, *p.shape) if p.layered else p.shape


def _nest(flat: dict[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def unstack_layers(tree: dict, n_layers: int) -> dict:
  """Scanned layout (`layers` stacked on axis 0) -> unrolled (`layers_0`, `layers_1`, ...)."""
  tree = dict(tree)
  stacked = tree.pop('layers')
  for i in range(n_layers):
    tree[f'layers_{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return tree


# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Reading (import)

def load_hf_params(hf_dir: str, cfg: ModelConfig, dtype: np.dtype, log=print) -> dict:
  """The HF weights in our (scanned) layout as numpy arrays of `dtype`, filled tensor by tensor.

  config.json is no more trusted than the weights: the safetensors headers are read and checked
  first, and every tensor's name and shape, the number of layers among them, against what config.json
  implies, before anything of config.json's sizes is allocated."""
  reader = safetensors.SafetensorsReader(hf_dir)
  where = os.path.join(hf_dir, 'config.json')
  layers = sorted({int(m.group(1)) for m in map(_LAYER.match, reader.entries) if m})
  if len(layers) != cfg.n_layers or (layers and layers[-1] != cfg.n_layers - 1):
    found = f'layers {layers[0]}-{layers[-1]}' if layers else 'no layers'
    raise ValueError(f'{where} says num_hidden_layers={cfg.n_layers}, but the safetensors of {hf_dir} hold '
                     f'{len(layers)} ({found}); check that config.json describes these weights')
  params = param_map(cfg)
  by_name: dict[str, tuple[_Param, int | None]] = {}
  for p in params:
    if p.layered:
      for i in range(cfg.n_layers):
        by_name[p.hf_name.format(i)] = (p, i)
    else:
      by_name[p.hf_name] = (p, None)
  unknown = [n for n in reader.entries if n not in by_name and not _IGNORED.match(n)]
  tied_copy = cfg.tie_embeddings and 'lm_head.weight' in unknown
  if tied_copy:
    unknown.remove('lm_head.weight')  # some tied checkpoints store the shared matrix twice: checked below
    lm_head = reader.entries['lm_head.weight']
    if lm_head.shape != params[0].hf_shape:
      raise ValueError(f"{lm_head.file}: lm_head.weight has shape {lm_head.shape}, but the folder's "
                       f'config.json implies {params[0].hf_shape}')
  if unknown:
    raise ValueError(f'{hf_dir}: {len(unknown)} tensor(s) this model has no place for, e.g. '
                     f'{unknown[:5]}; check that config.json describes these weights')
  missing = sorted(set(by_name) - set(reader.entries))
  if missing:
    raise ValueError(f'{hf_dir}: {len(missing)} tensor(s) missing, e.g. {missing[:5]}'
                     + ('; config.json says tie_word_embeddings=false but there is no lm_head.weight'
                        if 'lm_head.weight' in missing else ''))
  for name, (p, _) in by_name.items():
    have = reader.entries[name].shape
    if have != p.hf_shape:
      raise ValueError(f"{reader.entries[name].file}: {name} has shape {have}, but the folder's config.json "
                       f'implies {p.hf_shape}')
  # Only now allocate: np.empty touches no memory until a tensor is written into it.
  arrays = {p.path: np.empty(_our_shape(p, cfg), dtype) for p in params}
  start, done = time.time(), 0
  bar = progress_bar(len(by_name), 'Importing tensors', log)
  for name in reader.names_in_file_order():
    if name not in by_name:
      continue
    p, i = by_name[name]
    dest = p.as_hf(arrays[p.path] if i is None else arrays[p.path][i])
    # Block by block (bounded temporary memory), each one strided copy with the cast.
    for rows in p.row_blocks(_BLOCK_BYTES, reader.entries[name].dtype.itemsize):
      block = reader.read(name, rows)
      if p.transposed:
        dest[:, rows] = block.T
      else:
        dest[rows] = block
      del block
    done += 1
    bar.update(1)
    if log and bar.disable and done % 100 == 0:
      log(f'  {done}/{len(by_name)} tensors ({time.time() - start:.0f} s)')
  bar.close()
  embed = arrays[('token_embed',)]
  if tied_copy and not all(np.array_equal(reader.read('lm_head.weight', rows).astype(dtype), embed[rows])
                           for rows in params[0].row_blocks(_BLOCK_BYTES, embed.itemsize)):
    raise ValueError(f'{hf_dir}: config.json says tie_word_embeddings=true, but lm_head.weight differs '
                     'from model.embed_tokens.weight')
  return _nest(arrays)


# --------------------------------------------------------------------------------------------------
# Writing (export)

def hf_tensors(params: dict, cfg: ModelConfig, dtype: np.dtype) -> list:
  """Our parameters (host arrays, scanned or unrolled layers) as HF tensors in HF's usual order:
  `(name, shape, dtype, blocks)`, where `blocks()` yields the tensor's rows a block at a time, in
  HF's layout (see safetensors.write_safetensors)."""

  def get(path, layer):
    """Our array at `path`, for one layer if `layer` is given."""
    node = params if layer is None or cfg.scan_layers else params[f'layers_{layer}']
    for key in (path if layer is None or cfg.scan_layers else path[1:]):
      node = node[key]
    return node if layer is None or not cfg.scan_layers else node[layer]

  def blocks(p: _Param, layer: int | None):
    ours = p.as_hf(get(p.path, layer))
    for rows in p.row_blocks(_BLOCK_BYTES, dtype.itemsize):
      yield ours[:, rows].T if p.transposed else ours[rows]

  maps = param_map(cfg)
  tensors = [(p.hf_name, p.hf_shape, dtype, functools.partial(blocks, p, None))
             for p in maps if not p.layered]
  for i in range(cfg.n_layers):
    tensors += [(p.hf_name.format(i), p.hf_shape, dtype, functools.partial(blocks, p, i))
                for p in maps if p.layered]
  return tensors


def write_weights(out: str, tensors: list, shard_size: int, log=print) -> list[str]:
  """Writes `tensors` (see `hf_tensors`) as `model.safetensors`, or as shards of at most `shard_size`
  bytes with `model.safetensors.index.json`. Returns the file names."""
  log = log or silent
  shards, size = [[]], 0
  for tensor in tensors:
    nbytes = math.prod(tensor[1]) * tensor[2].itemsize
    if shards[-1] and size + nbytes > shard_size:
      shards.append([])
      size = 0
    shards[-1].append(tensor)
    size += nbytes
  bar = progress_bar(len(tensors), 'Exporting tensors', log)
  if not bar.disable and log is print:
    log = bar.write  # prints around the bar

  def counted(blocks):
    def each():
      yield from blocks()
      bar.update(1)
    return each
  shards = [[(n, shape, d, counted(blocks)) for n, shape, d, blocks in shard] for shard in shards]
  if len(shards) == 1:
    names = ['model.safetensors']
  else:
    names = [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))]
  for name, shard in zip(names, shards):
    safetensors.write_safetensors(os.path.join(out, name), shard)
    log(f'Wrote {out}/{name} ({len(shard)} tensors)')
  bar.close()
  if len(shards) > 1:
    index = {'metadata': {'total_size': sum(math.prod(t[1]) * t[2].itemsize for t in tensors)},
             'weight_map': {t[0]: name for name, shard in zip(names, shards) for t in shard}}
    write_json(os.path.join(out, 'model.safetensors.index.json'), index)
  return names


def write_json(path: str, value: dict):
  with open(path, 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write('\n')


def progress_bar(total: int, desc: str, log):
  """A bar of tensors converted, on stderr and only on a terminal; none when `log` is silent."""
  return tqdm.tqdm(total=total, desc=desc, unit='tensor', disable=None if log not in (None, silent) else True)


def silent(*_):
  pass

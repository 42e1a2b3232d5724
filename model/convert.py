"""Hugging Face <-> flaxlm checkpoints, for LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM.

  python -m model.convert import --hf-dir Meta-Llama-3-8B --out ckpt/llama3_8b [--tokenizer DIR]
  python -m model.convert export --ckpt runs/sft --out hf/my-model [--tokenizer DIR] [--arch llama] \
      [--chat-template llama3]

`import` reads `config.json` and the (sharded) safetensors, derives a ModelConfig (saying which preset it
matches), and writes `<out>/checkpoints/0/{state,model_config}`: the layout our trainers write, so that
`--config.init_from=<out>` and `python -m model.generate --ckpt <out>` read it. It streams: each stacked
parameter [L, ...] is allocated once in the target dtype and filled tensor by tensor as the safetensors
are read, so peak memory stays near one copy of the weights in that dtype (see docs/huggingface.md for
the measured figure).

`export` is the inverse: safetensors (sharded past --shard-size) plus `config.json` and
`generation_config.json`, which `transformers` (and vLLM) load as the same architecture.

Layouts: our rotary embedding is the Hugging Face "rotate half" one, so q/k weights need no
permutation; HF Linear weights are [out, in], ours [in, ...heads...]. The safetensors format is simple
(an 8-byte header length, a JSON header, then raw little-endian tensors) and is read and written here
directly: numpy has no bfloat16 of its own, and reading into preallocated buffers is what keeps the
memory flat. No TensorFlow and no torch are imported.
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import struct
import sys
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from model.config import PRESETS, ModelConfig

# --------------------------------------------------------------------------------------------------
# safetensors files

_ST_DTYPES = {
    'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16),
    'BF16': np.dtype(ml_dtypes.bfloat16), 'I64': np.dtype(np.int64), 'I32': np.dtype(np.int32),
    'I16': np.dtype(np.int16), 'I8': np.dtype(np.int8), 'U8': np.dtype(np.uint8),
    'BOOL': np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
DTYPES = {'float32': np.dtype(np.float32), 'bfloat16': np.dtype(ml_dtypes.bfloat16),
          'float16': np.dtype(np.float16)}
_TORCH_DTYPES = {'float32': 'float32', 'bfloat16': 'bfloat16', 'float16': 'float16',
                 'torch.float32': 'float32', 'torch.bfloat16': 'bfloat16', 'torch.float16': 'float16'}


@dataclasses.dataclass(frozen=True)
class _Entry:
  file: str
  dtype: np.dtype
  shape: tuple[int, ...]
  begin: int  # absolute byte offsets in `file`
  end: int


class SafetensorsReader:
  """The tensors of a Hugging Face model folder (`model.safetensors` or a sharded index), read lazily."""

  def __init__(self, hf_dir: str):
    if sys.byteorder != 'little':
      raise RuntimeError('safetensors are little-endian; this reader assumes a little-endian host')
    index = os.path.join(hf_dir, 'model.safetensors.index.json')
    if os.path.exists(index):
      with open(index) as f:
        files = sorted(set(json.load(f)['weight_map'].values()))
    else:
      files = sorted(f for f in os.listdir(hf_dir) if f.endswith('.safetensors'))
    if not files:
      bins = [f for f in os.listdir(hf_dir) if f.endswith(('.bin', '.pt', '.pth'))]
      hint = (f' It has PyTorch pickles ({bins[:3]}); re-save them as safetensors first, e.g. '
              '`AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR)`.' if bins else '')
      raise FileNotFoundError(f'{hf_dir}: no *.safetensors files.{hint}')
    self.entries: dict[str, _Entry] = {}
    for name in files:
      path = os.path.join(hf_dir, name)
      for key, entry in _read_header(path).items():
        if key in self.entries:
          raise ValueError(f'{hf_dir}: tensor {key} is stored twice ({self.entries[key].file}, {path})')
        self.entries[key] = entry

  def names_in_file_order(self) -> list[str]:
    """Tensor names sorted by file and offset, so that reading them in turn reads each file once."""
    return sorted(self.entries, key=lambda k: (self.entries[k].file, self.entries[k].begin))

  def read(self, name: str, rows: slice = slice(None)) -> np.ndarray:
    """The tensor, or a contiguous range of its rows (axis 0)."""
    e = self.entries[name]
    if e.end - e.begin != math.prod(e.shape) * e.dtype.itemsize:
      raise ValueError(f'{e.file}: tensor {name} has {e.end - e.begin} bytes, its shape {e.shape} needs '
                       f'{math.prod(e.shape) * e.dtype.itemsize}')
    start, stop, _ = rows.indices(e.shape[0]) if e.shape else (0, 1, 1)
    row_items = math.prod(e.shape[1:])
    count = (stop - start) * row_items
    with open(e.file, 'rb') as f:
      f.seek(e.begin + start * row_items * e.dtype.itemsize)
      out = np.fromfile(f, dtype=e.dtype, count=count)
    if out.size != count:
      raise ValueError(f'{e.file}: tensor {name} is truncated')
    return out.reshape((stop - start, *e.shape[1:]) if e.shape else ())


def _read_header(path: str) -> dict[str, _Entry]:
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    (header_len,) = struct.unpack('<Q', f.read(8))
    if header_len > size - 8:
      raise ValueError(f'{path} is not a safetensors file (header length {header_len} > file size)')
    header = json.loads(f.read(header_len))
  header.pop('__metadata__', None)
  entries = {}
  for key, info in header.items():
    if info['dtype'] not in _ST_DTYPES:
      raise ValueError(f'{path}: tensor {key} has unsupported dtype {info["dtype"]}')
    begin, end = info['data_offsets']
    entries[key] = _Entry(path, _ST_DTYPES[info['dtype']], tuple(info['shape']), 8 + header_len + begin,
                          8 + header_len + end)
  return entries


def write_safetensors(path: str,
                      tensors: list[tuple[str, tuple[int, ...], np.dtype, Callable[[], Iterator[np.ndarray]]]]):
  """Writes `(name, shape, dtype, blocks)` tensors; `blocks()` yields the tensor's rows in order, in
  blocks of any size, and is called only when the tensor's turn comes (memory stays flat)."""
  header, offset = {'__metadata__': {'format': 'pt'}}, 0
  for name, shape, dtype, _ in tensors:
    nbytes = math.prod(shape) * dtype.itemsize
    header[name] = {'dtype': _ST_NAMES[dtype], 'shape': list(shape), 'data_offsets': [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)  # keep the tensor data 8-byte aligned
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(struct.pack('<Q', len(blob)) + blob)
    for name, shape, dtype, blocks in tensors:
      written = 0
      for block in blocks():
        block = np.ascontiguousarray(block, dtype=dtype)
        f.write(block.reshape(-1).view(np.uint8).data)
        written += block.size
      if written != math.prod(shape):
        raise AssertionError(f'{name}: wrote {written} values, declared shape {shape}')
  os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig

ARCHITECTURES = {'LlamaForCausalLM': 'llama', 'MistralForCausalLM': 'mistral',
                 'Qwen2ForCausalLM': 'qwen2'}
_ARCH_CLASS = {v: k for k, v in ARCHITECTURES.items()}
# Fields that fix the weights' shapes and the function they compute (what a preset must agree on).
_SHAPE_FIELDS = ('vocab_size', 'embed_dim', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim', 'mlp_dim',
                 'norm_eps', 'rope_theta', 'rope_scaling_factor', 'rope_low_freq_factor',
                 'rope_high_freq_factor', 'rope_original_max_len', 'qkv_bias', 'tie_embeddings')


def _rope(hf: dict) -> tuple[float, dict]:
  """(theta, scaling dict or {}) from either the transformers<5 keys (`rope_theta`, `rope_scaling`)
  or the transformers>=5 `rope_parameters`."""
  params = hf.get('rope_parameters') or {}
  scaling = hf.get('rope_scaling') or {}
  theta = params.get('rope_theta', hf.get('rope_theta', 10000.0))
  merged = {**scaling, **{k: v for k, v in params.items() if k != 'rope_theta'}}
  return float(theta), merged


def config_from_hf(hf: dict, **overrides) -> tuple[ModelConfig, str, list[str]]:
  """(ModelConfig, architecture name, notes) from a parsed `config.json`. Unsupported features are
  errors naming the config.json key; `overrides` set ModelConfig fields (e.g. dtype)."""
  archs = hf.get('architectures') or []
  arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
  if arch is None:
    model_type = hf.get('model_type')
    arch = model_type if model_type in _ARCH_CLASS else None
  if arch is None:
    raise ValueError(f'config.json architectures={archs} model_type={hf.get("model_type")!r}: only '
                     f'{sorted(ARCHITECTURES)} are supported')
  notes = []

  def unsupported(key, value, why):
    raise ValueError(f'config.json {key}={value!r} is not supported: {why}')

  act = hf.get('hidden_act', 'silu')
  if act not in ('silu', 'swish'):
    unsupported('hidden_act', act, 'the MLP is SwiGLU (silu)')
  if hf.get('attention_bias'):
    unsupported('attention_bias', True, 'biases on all of q/k/v/o; only the Qwen2 q/k/v bias is modelled')
  if hf.get('mlp_bias'):
    unsupported('mlp_bias', True, 'the MLP has no biases')
  theta, scaling = _rope(hf)
  rope_type = scaling.get('rope_type', scaling.get('type', 'default'))
  rope = {}
  if rope_type == 'llama3':
    rope = dict(rope_scaling_factor=float(scaling['factor']),
                rope_low_freq_factor=float(scaling['low_freq_factor']),
                rope_high_freq_factor=float(scaling['high_freq_factor']),
                rope_original_max_len=int(scaling['original_max_position_embeddings']))
  elif rope_type != 'default':
    key = 'rope_parameters.rope_type' if 'rope_parameters' in hf else 'rope_scaling.rope_type'
    unsupported(key, rope_type, "supported rotary embeddings are 'default' and 'llama3'")

  heads = hf['num_attention_heads']
  max_len = int(hf.get('max_position_embeddings', 4096))
  # Sliding-window attention: our attention is full, which equals a sliding window of W exactly for
  # sequences of up to W tokens. So cap the sequence length there rather than compute something else.
  window = hf.get('sliding_window')
  if arch == 'qwen2':
    layer_types = hf.get('layer_types') or []
    uses_window = hf.get('use_sliding_window', False) and (
        'sliding_attention' in layer_types if layer_types
        else hf.get('max_window_layers', 0) < hf['num_hidden_layers'])
    window = window if uses_window else None
  elif arch == 'llama':
    window = None
  if window and window < max_len:
    notes.append(f'config.json sliding_window={window} < max_position_embeddings={max_len}: this model '
                 f'uses full attention, which is exact up to {window} tokens, so max_seq_len is set to '
                 f'{window}')
    max_len = int(window)

  dtype = _TORCH_DTYPES.get(str(hf.get('torch_dtype') or hf.get('dtype') or 'float32'), 'float32')
  values = dict(
      vocab_size=hf['vocab_size'], embed_dim=hf['hidden_size'], n_layers=hf['num_hidden_layers'],
      n_heads=heads, n_kv_heads=hf.get('num_key_value_heads') or heads,
      head_dim=hf.get('head_dim') or hf['hidden_size'] // heads, mlp_dim=hf['intermediate_size'],
      norm_eps=float(hf.get('rms_norm_eps', 1e-6)), rope_theta=theta, **rope, max_seq_len=max_len,
      qkv_bias=arch == 'qwen2', tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
      init_std=float(hf.get('initializer_range', 0.02)), dtype='bfloat16', param_dtype=dtype)
  values.update(overrides)
  return ModelConfig(**values), arch, notes


def matching_preset(cfg: ModelConfig) -> tuple[str | None, str]:
  """(name, '') of the preset with the same shapes and numerics, else (None, how the closest differs)."""
  mine = {f: getattr(cfg, f) for f in _SHAPE_FIELDS}
  best, best_diff = None, None
  for name, values in PRESETS.items():
    theirs = dataclasses.asdict(ModelConfig(**values))
    diff = {f: (mine[f], theirs[f]) for f in _SHAPE_FIELDS if mine[f] != theirs[f]}
    if not diff:
      return name, ''
    if best_diff is None or len(diff) < len(best_diff):
      best, best_diff = name, diff
  return None, f'closest preset {best} differs in ' + ', '.join(
      f'{k} ({a} vs {b})' for k, (a, b) in best_diff.items())


def config_to_hf(cfg: ModelConfig, arch: str, dtype: str, bos_id: int | None = None,
                 eos_id: int | list[int] | None = None) -> dict:
  """config.json for `arch` (llama, mistral or qwen2) with the same function as `cfg`."""
  if arch not in _ARCH_CLASS:
    raise ValueError(f'--arch must be one of {sorted(_ARCH_CLASS)}, got {arch!r}')
  if cfg.qkv_bias != (arch == 'qwen2'):
    raise ValueError(f'model.qkv_bias={cfg.qkv_bias}: q/k/v biases are exported only as qwen2 (and qwen2 '
                     f'requires them), so --arch {arch} cannot represent this model'
                     + ('; use --arch qwen2' if cfg.qkv_bias else ''))
  if arch == 'qwen2' and cfg.head_dim * cfg.n_heads != cfg.embed_dim:
    raise ValueError(f'qwen2 requires head_dim * n_heads == embed_dim, got {cfg.head_dim} * '
                     f'{cfg.n_heads} != {cfg.embed_dim}')
  hf = {
      'architectures': [_ARCH_CLASS[arch]], 'model_type': arch,
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
    del hf['head_dim']  # derived from hidden_size / num_attention_heads
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
  if cfg.qkv_bias:
    out += [_Param(('layers', 'attn', f'{x}_bias'), attn + f'{x}_proj.bias', (heads * h,), (heads, h))
            for x, heads in (('q', n), ('k', k), ('v', k))]
  if not cfg.tie_embeddings:
    out.append(_Param(('unembed',), 'lm_head.weight', (v, d), (d, v), True))
  return out


# HF tensors that carry no weights of the model (recomputed buffers).
_IGNORED = re.compile(r'.*rotary_emb\.inv_freq$')


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


def _unstack_layers(tree: dict, n_layers: int) -> dict:
  """Scanned layout (`layers` stacked on axis 0) -> unrolled (`layers_0`, `layers_1`, ...)."""
  tree = dict(tree)
  stacked = tree.pop('layers')
  for i in range(n_layers):
    tree[f'layers_{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return tree


# --------------------------------------------------------------------------------------------------
# import

def load_hf_params(hf_dir: str, cfg: ModelConfig, dtype: np.dtype, log=print) -> dict:
  """The HF weights in our (scanned) layout as numpy arrays of `dtype`, filled tensor by tensor."""
  reader = SafetensorsReader(hf_dir)
  params = param_map(cfg)
  by_name: dict[str, tuple[_Param, int | None]] = {}
  for p in params:
    if p.layered:
      for i in range(cfg.n_layers):
        by_name[p.hf_name.format(i)] = (p, i)
    else:
      by_name[p.hf_name] = (p, None)
  # Only now allocate: np.empty touches no memory until a tensor is written into it.
  arrays = {p.path: np.empty(_our_shape(p, cfg), dtype) for p in params}
  unknown = [n for n in reader.entries if n not in by_name and not _IGNORED.match(n)]
  tied_copy = cfg.tie_embeddings and 'lm_head.weight' in unknown
  if tied_copy:
    unknown.remove('lm_head.weight')  # some tied checkpoints store the shared matrix twice: checked below
  if unknown:
    raise ValueError(f'{hf_dir}: {len(unknown)} tensor(s) this model has no place for, e.g. '
                     f'{unknown[:5]}; check that config.json describes these weights')
  missing = sorted(set(by_name) - set(reader.entries))
  if missing:
    raise ValueError(f'{hf_dir}: {len(missing)} tensor(s) missing, e.g. {missing[:5]}'
                     + ('; config.json says tie_word_embeddings=false but there is no lm_head.weight'
                        if 'lm_head.weight' in missing else ''))
  start, done = time.time(), 0
  bar = _progress_bar(len(by_name), 'Importing tensors', log)
  for name in reader.names_in_file_order():
    if name not in by_name:
      continue
    p, i = by_name[name]
    have = reader.entries[name].shape
    if have != p.hf_shape:
      raise ValueError(f'{hf_dir}: {name} has shape {have}, config.json implies {p.hf_shape}')
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


def import_hf(hf_dir: str, out: str, dtype: str | None = None, tokenizer: str | None = None,
              log=print, **overrides) -> ModelConfig:
  """Converts a HF model folder into `<out>/checkpoints/0`; returns the ModelConfig written."""
  log = log or _silent
  with open(os.path.join(hf_dir, 'config.json')) as f:
    hf = json.load(f)
  if dtype is not None:
    overrides['param_dtype'] = dtype
  cfg, arch, notes = config_from_hf(hf, **overrides)
  for note in notes:
    log(f'NOTE: {note}')
  name, diff = matching_preset(cfg)
  log(f'{_ARCH_CLASS[arch]}: ' + (f'matches preset {name!r}' if name else diff))
  if tokenizer:
    _check_tokenizer(tokenizer, cfg.vocab_size)
  out_dir = os.path.join(out, 'checkpoints')
  if os.path.exists(os.path.join(out_dir, '0')):
    raise FileExistsError(f'{out_dir}/0 exists already; choose a new --out')
  params = load_hf_params(hf_dir, cfg, DTYPES[cfg.param_dtype], log)
  if not cfg.scan_layers:
    params = _unstack_layers(params, cfg.n_layers)
  save_params(out_dir, cfg, params)
  log(f'Wrote {out_dir}/0 ({_nbytes(params) / 2**30:.2f} GiB of {cfg.param_dtype} parameters)')
  return cfg


def save_params(directory: str, cfg: ModelConfig, params: dict, step: int = 0):
  """Writes `<directory>/<step>/{state,model_config}` as train/checkpoint.py's Checkpointer does, with
  state = {'params': params}, without the memory orbax would otherwise add: its default numpy handler
  deep-copies every array before writing, and OCDBT buffers all the written data until the end unless
  told to close data files at a target size."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  registry = ocp.type_handlers.create_type_handler_registry(
      (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
      (jax.Array, ocp.type_handlers.ArrayHandler()))
  options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=False)
  handlers = {'state': ocp.PyTreeCheckpointHandler(type_handler_registry=registry, save_concurrent_gb=1),
              'model_config': ocp.JsonCheckpointHandler()}
  with ocp.CheckpointManager(directory, options=options, item_handlers=handlers) as manager:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave({'params': params}, ocdbt_target_data_file_size=64 * 2**20),
        model_config=ocp.args.JsonSave(dataclasses.asdict(cfg))))
    manager.wait_until_finished()


def _silent(*_):
  pass


def _nbytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def _check_tokenizer(path: str, model_vocab: int):
  from data.tokenizer import check_vocab, load_tokenizer  # pylint: disable=import-outside-toplevel
  check_vocab(load_tokenizer(path), model_vocab)


# --------------------------------------------------------------------------------------------------
# export

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'tokenizer.model')


def load_params_numpy(ckpt: str, cfg: ModelConfig, dtype: str) -> dict:
  """A checkpoint's parameters as host numpy arrays, cast to `dtype` as they are read (no device and
  no second copy), after checking every shape against `cfg`."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from model.transformer import Transformer  # pylint: disable=import-outside-toplevel
  from train import checkpoint  # pylint: disable=import-outside-toplevel
  expected = nn.meta.unbox(jax.eval_shape(lambda: Transformer(cfg).init(
      jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))['params'])
  checkpoint.check_params_match(ckpt, expected)
  state_dir = checkpoint.resolve_step_dir(ckpt) / 'state'
  checkpointer = ocp.PyTreeCheckpointer()
  target = jax.tree.map(lambda s: np.empty((0,), DTYPES[dtype]), expected)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray, dtype=DTYPES[dtype]),
                              expected)
  restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
      item={'params': target}, restore_args={'params': restore_args}, partial_restore=True))
  return restored['params']


def export_hf(ckpt: str, out: str, arch: str | None = None, dtype: str = 'bfloat16',
              tokenizer: str | None = None, shard_size: int = 5 * 2**30, chat_template: str = '',
              log=print) -> dict:
  """Writes `out/` that `transformers.AutoModelForCausalLM.from_pretrained(out)` loads. Returns the
  config.json written. With `chat_template` (needs `tokenizer`), generation_config.json stops at the
  template's end-of-turn tokens too, as transformers' generate and vLLM read it."""
  from train import checkpoint  # pylint: disable=import-outside-toplevel
  log = log or _silent
  cfg = checkpoint.load_model_config(ckpt)
  arch = arch or ('qwen2' if cfg.qkv_bias else 'llama')
  if dtype not in DTYPES:
    raise ValueError(f'--dtype must be one of {sorted(DTYPES)}, got {dtype!r}')
  bos = eos = None
  if tokenizer:
    from data.tokenizer import check_vocab, load_tokenizer  # pylint: disable=import-outside-toplevel
    tok = load_tokenizer(tokenizer)
    check_vocab(tok, cfg.vocab_size)
    bos, eos = tok.bos_id, tok.eos_id
  stop_ids = [eos] if eos is not None else []
  if chat_template:
    if not tokenizer:
      raise ValueError('--chat-template needs --tokenizer (to look up its end-of-turn tokens)')
    from data import chat  # pylint: disable=import-outside-toplevel
    stop_ids = list(dict.fromkeys(chat.get_template(chat_template).stop_ids(tok) + stop_ids))
  hf_config = config_to_hf(cfg, arch, dtype, bos, eos)
  os.makedirs(out, exist_ok=True)
  params = load_params_numpy(ckpt, cfg, dtype)

  def get(path, layer):
    """Our array at `path`, for one layer if `layer` is given (scanned or unrolled checkpoints)."""
    node = params if layer is None or cfg.scan_layers else params[f'layers_{layer}']
    for key in (path if layer is None or cfg.scan_layers else path[1:]):
      node = node[key]
    return node if layer is None or not cfg.scan_layers else node[layer]

  # (name, shape, dtype, make) in HF's usual order, split into shards of at most `shard_size` bytes.
  np_dtype = DTYPES[dtype]
  tensors = []
  maps = param_map(cfg)

  def blocks(p: _Param, layer: int | None):
    ours = p.as_hf(get(p.path, layer))
    for rows in p.row_blocks(_BLOCK_BYTES, np_dtype.itemsize):
      yield ours[:, rows].T if p.transposed else ours[rows]

  for p in maps:
    if not p.layered:
      tensors.append((p.hf_name, p.hf_shape, np_dtype, functools.partial(blocks, p, None)))
  for i in range(cfg.n_layers):
    for p in maps:
      if p.layered:
        tensors.append((p.hf_name.format(i), p.hf_shape, np_dtype, functools.partial(blocks, p, i)))
  shards, size = [[]], 0
  for tensor in tensors:
    nbytes = math.prod(tensor[1]) * np_dtype.itemsize
    if shards[-1] and size + nbytes > shard_size:
      shards.append([])
      size = 0
    shards[-1].append(tensor)
    size += nbytes
  bar = _progress_bar(len(tensors), 'Exporting tensors', log)
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
    write_safetensors(os.path.join(out, name), shard)
    log(f'Wrote {out}/{name} ({len(shard)} tensors)')
  if len(shards) > 1:
    index = {'metadata': {'total_size': sum(math.prod(t[1]) * np_dtype.itemsize for t in tensors)},
             'weight_map': {t[0]: name for name, shard in zip(names, shards) for t in shard}}
    _write_json(os.path.join(out, 'model.safetensors.index.json'), index)
  _write_json(os.path.join(out, 'config.json'), hf_config)
  generation = {'bos_token_id': bos, 'eos_token_id': stop_ids[0] if len(stop_ids) == 1 else (stop_ids or None)}
  _write_json(os.path.join(out, 'generation_config.json'), {k: v for k, v in generation.items() if v is not None})
  bar.close()
  if tokenizer:
    _copy_tokenizer(tokenizer, out, log)
  log(f'Wrote {out}: {_ARCH_CLASS[arch]}, {dtype}')
  return hf_config


def _progress_bar(total: int, desc: str, log):
  """A bar of tensors converted, on stderr and only on a terminal; none when `log` is silent."""
  import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm.tqdm(total=total, desc=desc, unit='tensor', disable=None if log not in (None, _silent) else True)


def _copy_tokenizer(path: str, out: str, log):
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  copied = []
  if os.path.isfile(path) and path.endswith('.model'):
    shutil.copyfile(path, os.path.join(out, 'tokenizer.model'))
    copied.append('tokenizer.model')
  for name in TOKENIZER_FILES:
    src = os.path.join(folder, name)
    if os.path.isfile(src) and name not in copied:
      shutil.copyfile(src, os.path.join(out, name))
      copied.append(name)
  log(f'Copied tokenizer files {copied} from {folder}')


def _write_json(path: str, value: dict):
  with open(path, 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write('\n')


# --------------------------------------------------------------------------------------------------
# CLI

def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  commands = parser.add_subparsers(dest='command', required=True)
  imp = commands.add_parser('import', help='Hugging Face folder -> orbax checkpoint')
  imp.add_argument('--hf-dir', '--hf_dir', dest='hf_dir', required=True,
                   help='Folder with config.json and *.safetensors (e.g. a `huggingface-cli download`).')
  imp.add_argument('--out', required=True, help='Output folder; the checkpoint goes to OUT/checkpoints/0.')
  imp.add_argument('--dtype', choices=sorted(DTYPES), default=None,
                   help='Parameter dtype stored (default: config.json torch_dtype, e.g. bfloat16; '
                        'trainers cast to their own param_dtype when they load).')
  imp.add_argument('--tokenizer', default=None,
                   help='Optional tokenizer (.model, tokenizer.json or its folder) to check against the '
                        'vocabulary.')
  imp.add_argument('--max-seq-len', '--max_seq_len', dest='max_seq_len', type=int, default=None,
                   help='Override max_seq_len (default: config.json max_position_embeddings).')
  imp.add_argument('--no-scan-layers', dest='scan_layers', action='store_false',
                   help='Write layers_0, layers_1, ... instead of layers stacked on axis 0.')
  exp = commands.add_parser('export', help='orbax checkpoint -> Hugging Face folder')
  exp.add_argument('--ckpt', required=True, help='Workdir, checkpoints folder or step folder.')
  exp.add_argument('--out', required=True, help='Output folder.')
  exp.add_argument('--arch', choices=sorted(_ARCH_CLASS), default=None,
                   help='Architecture to write (default: qwen2 when the model has q/k/v biases, else llama; '
                        'mistral and llama are the same function for full attention).')
  exp.add_argument('--dtype', choices=sorted(DTYPES), default='bfloat16')
  exp.add_argument('--tokenizer', default=None,
                   help='Tokenizer (.model, tokenizer.json or its folder): its files are copied and its '
                        'BOS/EOS ids written into config.json.')
  exp.add_argument('--chat-template', '--chat_template', dest='chat_template', default='',
                   help='The chat template the model was tuned with (data/chat.py): generation stops at '
                        'its end-of-turn tokens (written to generation_config.json).')
  exp.add_argument('--shard-size-gb', '--shard_size_gb', dest='shard_size_gb', type=float, default=5.0)
  args = parser.parse_args(argv)
  if args.command == 'import':
    overrides = {'scan_layers': args.scan_layers}
    if args.max_seq_len:
      overrides['max_seq_len'] = args.max_seq_len
    import_hf(args.hf_dir, args.out, args.dtype, args.tokenizer, **overrides)
  else:
    export_hf(args.ckpt, args.out, args.arch, args.dtype, args.tokenizer,
              int(args.shard_size_gb * 2**30), args.chat_template)


if __name__ == '__main__':
  main()

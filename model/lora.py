"""LoRA and QLoRA: low-rank adapters on the decoder's projections, over a frozen base.

A targeted projection `y = x W` becomes `y = x W + s (x A) B` with `A` [contracting dims..., r] and
`B` [r, output dims...] (Hu et al. 2021), `s = alpha / r` (or `alpha / sqrt(r)`, rsLoRA). `B` starts
at zero, so a fresh adapter is an exact no-op. The adapters are parameters of the model itself
(`{name}_lora_a`, `{name}_lora_b` next to the weight `name`, created in model/transformer.py), so they
carry logical axes, scan over layers and rematerialise like every other weight.

The frozen base may be stored quantized (`base_dtype`): `int8` (symmetric) or `nf4` (QLoRA's 4-bit
NormalFloat, Dettmers et al. 2023), both with one float32 absmax scale per block of `block_size`
elements along the weight's last contracting axis (for an [in, out] matrix: 64 consecutive input
features of one output, bitsandbytes' blocks). Such a weight is dequantized inside its matmul and
its backward pass (`dequantized_einsum`), never kept whole: the backward pass recomputes it rather
than saving it.

This module is pure math and configuration; the model (model/transformer.py) creates the parameters,
and model/weights/adapters.py loads and saves them.
"""

import dataclasses
import functools
import math
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# The projections that may carry adapters: parameter name -> (short name, number of output axes).
# Their weights put the contracted axes first: q_proj [D, N, H] (2 output axes), o_proj [N, H, D] (1).
PROJECTIONS = {'q_proj': ('q', 2), 'k_proj': ('k', 2), 'v_proj': ('v', 2), 'o_proj': ('o', 1),
               'gate_proj': ('gate', 1), 'up_proj': ('up', 1), 'down_proj': ('down', 1)}
ALL_TARGETS = ','.join(short for short, _ in PROJECTIONS.values())
QUANTIZED = {'int8': jnp.int8, 'nf4': jnp.uint4}  # base_dtype -> dtype of the stored codes
BASE_DTYPES = ('', 'float32', 'bfloat16', 'float16', *QUANTIZED)
ADAPTER_MARK = '_lora_'  # in the name of every adapter parameter
SCALE_SUFFIX = '_scale'  # a quantized weight `name` keeps its block scales in `name_scale`

# QLoRA's NF4 code values (Appendix E; bitsandbytes' table): code i stands for NF4[i] * absmax.
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
# Worst-case round-trip error, as a fraction of the block's absmax: half the widest gap between codes
# (NF4: between -1 and -0.696; int8: half a step of 1/127).
ERROR_BOUND = {'nf4': float(np.max(np.diff(NF4.astype(np.float64))) / 2), 'int8': 0.5 / 127}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """`config.lora`. `rank` 0 turns LoRA off (every parameter trains)."""
  rank: int = 0
  alpha: float = 16.0
  dropout: float = 0.0      # on the adapters' input, in training only
  # Comma-separated names among q, k, v, o, gate, up, down (or their parameter names, q_proj, ...), or
  # a regular expression matched against whole parameter paths, e.g. 'layers_(0|1)/attn/(q|v)_proj'.
  targets: str = ALL_TARGETS
  # The frozen base: '' (model.param_dtype), float32, bfloat16, float16, or the projections stored as
  # int8 or nf4 (QLoRA), the other frozen weights (embeddings, norms) in model.param_dtype.
  base_dtype: str = ''
  block_size: int = 64      # int8 / nf4: elements per absmax scale, along the contracting axis
  rslora: bool = False      # scale alpha / sqrt(rank) instead of alpha / rank

  def __post_init__(self):
    errors = []
    if self.rank < 0:
      errors.append(f'lora.rank must be >= 0 (0: off), got {self.rank}')
    if self.alpha <= 0:
      errors.append(f'lora.alpha must be positive, got {self.alpha}')
    if not 0 <= self.dropout < 1:
      errors.append(f'lora.dropout must be in [0, 1), got {self.dropout}')
    if self.base_dtype not in BASE_DTYPES:
      errors.append(f'lora.base_dtype must be one of {list(BASE_DTYPES)}, got {self.base_dtype!r}')
    if self.block_size <= 0:
      errors.append(f'lora.block_size must be positive, got {self.block_size}')
    try:
      self.patterns  # pylint: disable=pointless-statement
    except re.error as e:
      errors.append(f'lora.targets={self.targets!r} is neither a list of projection names '
                    f'({ALL_TARGETS}) nor a valid regular expression: {e}')
    if errors:
      raise ValueError('Invalid LoRA config:\n  ' + '\n  '.join(errors))

  @classmethod
  def from_dict(cls, values: Mapping[str, Any] | None) -> 'LoraConfig':
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f'Unknown lora config key(s) {unknown}; expected a subset of {sorted(known)}')
    return cls(**values)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def quantized(self) -> bool:
    return self.enabled and self.base_dtype in QUANTIZED

  def base_config(self, cfg):
    """The ModelConfig the base is held in: a float `base_dtype` is its `param_dtype` (the quantized
    ones store the projections only; the other frozen weights keep `param_dtype`)."""
    if self.enabled and self.base_dtype and self.base_dtype not in QUANTIZED:
      return dataclasses.replace(cfg, param_dtype=self.base_dtype)
    return cfg

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  @functools.cached_property
  def patterns(self) -> tuple[re.Pattern, ...]:
    items = [t.strip() for t in self.targets.split(',') if t.strip()]
    by_short = {short: name for name, (short, _) in PROJECTIONS.items()}
    if items and all(t in by_short or t in PROJECTIONS for t in items):
      return tuple(re.compile(rf'(.*/)?{by_short.get(t, t)}') for t in items)
    return (re.compile(self.targets),)

  def targets_path(self, path: str) -> bool:
    """Whether the projection at `path` (e.g. 'layers/attn/q_proj') gets an adapter."""
    return self.enabled and any(p.fullmatch(path) for p in self.patterns)


# --------------------------------------------------------------------------------------------------
# Checks against a model's parameter tree

def _projection_leaves(base_shapes):
  """(path string, projection name, per-layer shape) of every projection weight in a plain tree."""
  for path, leaf in traverse_util.flatten_dict(base_shapes).items():
    if path[-1] in PROJECTIONS:
      shape = tuple(leaf.shape)[1:] if path[0] == 'layers' else tuple(leaf.shape)  # scanned: [L, ...]
      yield '/'.join(path), path[-1], shape


def problems(lora: LoraConfig, base_shapes) -> list[str]:
  """What is wrong with `lora` for the model whose plain parameter tree (shapes) is `base_shapes`:
  each a line naming the lora.* key."""
  if not lora.enabled:
    return []
  errors, seen = [], set()
  leaves = list(_projection_leaves(base_shapes))
  targeted = [leaf for leaf in leaves if lora.targets_path(leaf[0])]
  if not targeted:
    errors.append(f'lora.targets={lora.targets!r} matches no projection: expected comma-separated '
                  f'names among {ALL_TARGETS}, or a regular expression over parameter paths such as '
                  f'{leaves[0][0]!r}')
  for path, name, shape in targeted:
    n_in = len(shape) - PROJECTIONS[name][1]
    fan_in, fan_out = math.prod(shape[:n_in]), math.prod(shape[n_in:])
    if lora.rank > min(fan_in, fan_out) and name not in seen:
      seen.add(name)
      errors.append(f'lora.rank={lora.rank} is larger than the dimensions of {path} ({fan_in} in, '
                    f'{fan_out} out): a rank above min(in, out) adds nothing')
  if lora.quantized:
    for path, name, shape in leaves:
      axis = block_axis(name)
      if shape[axis] % lora.block_size and name not in seen:
        seen.add(name)
        errors.append(f'lora.block_size={lora.block_size} does not divide the contracting dimension '
                      f'of {path} ({shape[axis]}); {lora.base_dtype} scales one block of '
                      f'lora.block_size elements along it')
  return errors


def check(lora: LoraConfig, base_shapes):
  errors = problems(lora, base_shapes)
  if errors:
    raise ValueError('Invalid LoRA config:\n  ' + '\n  '.join(errors))


# --------------------------------------------------------------------------------------------------
# Adapters

def adapter_shapes(name: str, shape, axes, rank: int):
  """((A shape, A logical axes), (B shape, B logical axes)) for the projection `name` of `shape` /
  `axes`: A [contracted axes..., r], B [r, output axes...]."""
  shape, axes = tuple(shape), tuple(axes)
  n_in = len(shape) - PROJECTIONS[name][1]
  return ((shape[:n_in] + (rank,), axes[:n_in] + ('lora_rank',)),
          ((rank,) + shape[n_in:], ('lora_rank',) + axes[n_in:]))


def a_init(a_shape):
  """PEFT's default for A, kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  return nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform',
                                          in_axis=tuple(range(len(a_shape) - 1)), out_axis=-1)


def delta(subscripts: str, x, a, b, scale: float, dtype):
  """s (x A) B for a projection `subscripts` ('XD,DNH->XNH'), in the compute dtype."""
  (lhs, rhs), out = subscripts.split('->')[0].split(','), subscripts.split('->')[1]
  n_in = a.ndim - 1
  contracted, kept = rhs[:n_in], rhs[n_in:]
  low = ''.join(c for c in lhs if c not in contracted) + 'r'
  xa = jnp.einsum(f'{lhs},{contracted}r->{low}', x, a.astype(dtype))
  return jnp.einsum(f'{low},r{kept}->{out}', xa, b.astype(dtype)) * jnp.asarray(scale, dtype)


def is_adapter(path: tuple[str, ...]) -> bool:
  return ADAPTER_MARK in str(path[-1])


def split(params) -> tuple[dict, dict]:
  """(adapters, base) of a parameter tree holding both."""
  flat = traverse_util.flatten_dict(params)
  adapters = {k: v for k, v in flat.items() if is_adapter(k)}
  base = {k: v for k, v in flat.items() if not is_adapter(k)}
  return traverse_util.unflatten_dict(adapters), traverse_util.unflatten_dict(base)


def join(base, adapters) -> dict:
  """The model's parameter tree from the frozen base and the adapters."""
  return traverse_util.unflatten_dict({**traverse_util.flatten_dict(base),
                                       **traverse_util.flatten_dict(adapters)})


def merge(params, lora: LoraConfig) -> dict:
  """A plain parameter tree: every adapted weight W replaced by W + s A B (numpy or jax arrays; the
  product in float32, the result in W's dtype). The base must not be quantized."""
  if lora.quantized:
    raise ValueError(f'cannot merge adapters into a {lora.base_dtype} base; merge into the base '
                     'checkpoint it was quantized from')
  flat = traverse_util.flatten_dict(params)
  out = {}
  for path, w in flat.items():
    if is_adapter(path):
      continue
    a = flat.get(path[:-1] + (path[-1] + '_lora_a',))
    if a is not None:
      b = flat[path[:-1] + (path[-1] + '_lora_b',)]
      xp = np if isinstance(w, np.ndarray) else jnp
      rank = a.shape[-1]
      lead = b.ndim - 1 - PROJECTIONS[path[-1]][1]  # the stacked layers axis, if any
      a2 = a.reshape(a.shape[:lead] + (-1, rank)).astype(np.float32)
      b2 = b.reshape(b.shape[:lead] + (rank, -1)).astype(np.float32)
      w = (w.astype(np.float32) + lora.scale * xp.matmul(a2, b2).reshape(w.shape)).astype(w.dtype)
    out[path] = w
  return traverse_util.unflatten_dict(out)


# --------------------------------------------------------------------------------------------------
# Quantized base weights

def block_axis(name: str) -> int:
  """The axis a quantized projection's blocks run along: its last contracted axis, counted from the
  end (so that it holds with a stacked layers axis in front)."""
  return -PROJECTIONS[name][1] - 1


def scale_shape_and_axes(name: str, shape, axes, block: int):
  """The block scales of a quantized weight: its block axis divided by `block`. That axis is
  replicated (`quant_blocks`), since a block count need not divide the mesh."""
  axis = block_axis(name) % len(shape)
  shape, axes = list(shape), list(axes)
  shape[axis] //= block
  axes[axis] = 'quant_blocks'
  return tuple(shape), tuple(axes)


def _blocked(x, axis: int, block: int):
  """[..., C, ...] -> [..., C/block, block, ...] (axis counted from the end, so that a stacked layers
  axis in front changes nothing)."""
  axis = axis % x.ndim
  return x.reshape(x.shape[:axis] + (x.shape[axis] // block, block) + x.shape[axis + 1:]), axis


def quantize(w, kind: str, block: int, axis: int):
  """(codes, scale) of w: codes of w's shape (uint4 NF4 indices or int8), float32 absmax per block of
  `block` elements along `axis` (negative: from the end)."""
  blocks, axis = _blocked(w.astype(jnp.float32), axis, block)
  absmax = jnp.max(jnp.abs(blocks), axis=axis + 1)
  scaled = blocks / jnp.expand_dims(jnp.maximum(absmax, jnp.finfo(jnp.float32).tiny), axis + 1)
  if kind == 'nf4':
    midpoints = jnp.asarray((NF4[:-1] + NF4[1:]) / 2)
    # The nearest code; a value exactly between two goes to the lower one, as in bitsandbytes.
    codes = jnp.searchsorted(midpoints, jnp.clip(scaled, -1, 1), side='left')
  else:
    codes = jnp.clip(jnp.round(scaled * 127), -127, 127)
  return codes.reshape(w.shape).astype(QUANTIZED[kind]), absmax


def quantize_params(params, lora: LoraConfig) -> dict:
  """A plain parameter tree with every projection weight stored as `lora.base_dtype` says: codes
  under the weight's name and block scales beside it (the whole tree at once; model/weights/adapters.py
  quantizes a checkpoint a layer at a time)."""
  out = {}
  for path, w in traverse_util.flatten_dict(params).items():
    if path[-1] in PROJECTIONS and lora.quantized:
      out[path], out[path[:-1] + (path[-1] + SCALE_SUFFIX,)] = quantize(
          w, lora.base_dtype, lora.block_size, block_axis(path[-1]))
    else:
      out[path] = w
  return traverse_util.unflatten_dict(out)


def dequantize(codes, scale, kind: str, axis: int, dtype=jnp.float32):
  blocks, axis = _blocked(codes, axis, codes.shape[axis] // scale.shape[axis])
  if kind == 'nf4':
    values = jnp.asarray(NF4)[blocks.astype(jnp.int32)]
  else:
    values = blocks.astype(jnp.float32) / 127
  return (values * jnp.expand_dims(scale, axis + 1)).reshape(codes.shape).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4, 5, 6))
def dequantized_einsum(subscripts: str, x, codes, scale, kind: str, axis: int, dtype):
  """einsum(subscripts, x, W) for the quantized W = (codes, scale). Its backward pass (the gradient
  of x only: the base is frozen) dequantizes W again instead of saving it, so the dequantized weight
  exists only inside each matmul (which XLA:TPU fuses it into)."""
  return jnp.einsum(subscripts, x, dequantize(codes, scale, kind, axis, dtype))


def _dequantized_einsum_fwd(subscripts, x, codes, scale, kind, axis, dtype):
  return dequantized_einsum(subscripts, x, codes, scale, kind, axis, dtype), (codes, scale)


def _dequantized_einsum_bwd(subscripts, kind, axis, dtype, residuals, g):
  codes, scale = residuals
  (lhs, rhs), out = subscripts.split('->')[0].split(','), subscripts.split('->')[1]
  dx = jnp.einsum(f'{out},{rhs}->{lhs}', g, dequantize(codes, scale, kind, axis, g.dtype))
  return dx.astype(dtype), None, None


dequantized_einsum.defvjp(_dequantized_einsum_fwd, _dequantized_einsum_bwd)


# --------------------------------------------------------------------------------------------------
# Fingerprints: which base the adapters were trained on

_MIX = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D)


def leaf_fingerprint(x, offset: int = 0, xp=jnp):
  """A 32-bit hash of an array's values rounded to bfloat16 (so that a base read in float32 or in
  bfloat16 has the same one) and their positions, `offset` added to the flat position. Integer
  arithmetic modulo 2^32 only: the same on any mesh, on host (numpy) and device, and additive over
  slices of the array."""
  bits = xp.asarray(x).astype(jnp.bfloat16).view(np.uint16).astype(np.uint32)
  index = xp.zeros(x.shape, np.uint32) + xp.asarray(offset % 2**32 if isinstance(offset, int) else offset,
                                                    np.uint32)
  stride = 1
  for axis in reversed(range(x.ndim)):
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    index = index + xp.arange(x.shape[axis], dtype=np.uint32).reshape(shape) * np.uint32(stride % 2**32)
    stride *= x.shape[axis]
  h = (bits + np.uint32(1)) * np.uint32(_MIX[0]) ^ index * np.uint32(_MIX[1])
  h = (h ^ (h >> np.uint32(15))) * np.uint32(_MIX[2])
  h = h ^ (h >> np.uint32(13))
  return xp.sum(h, dtype=np.uint32)

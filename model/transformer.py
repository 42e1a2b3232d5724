"""The LLaMA-family decoder as a Flax linen module.

Einsum subscripts name dimensions: B batch, T query length, S key length, D embed, N query heads,
K key/value heads, G query heads per key/value head, H head dim, F mlp hidden, V vocab, L layers, and
X tokens (B and T merged; see `_token_einsum`).
Every parameter is created with logical axis names (see model/sharding.py for how they map to a mesh),
and activations are constrained to logical axes at block boundaries.
"""

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from model import attention as attention_lib
from model import lora as lora_lib
from model import remat
from model.config import ModelConfig
from model.lora import LoraConfig


def _param(module, name, shape, axes, init, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(dtype))


def _constrain(x, axes):
  return nn.with_logical_constraint(x, axes)


def _token_einsum(subscripts, x, w):
  """`jnp.einsum` of activations x [B, T, ...] with a weight, B and T merged into one token axis X.

  The same product as with 'BT...' subscripts, but its weight gradient contracts over one axis, not
  two: XLA:CPU then reads the activations' gradient as it is, where for two contracted axes it first
  writes a transposed copy of it (the tiny model's step: 359-370 ms instead of 423-460). Merging B
  with an unsharded T keeps the batch sharding; the TPU memory of the 7-8B configs is unchanged but
  for one (docs/benchmarks.md).
  """
  b, t = x.shape[:2]
  out = jnp.einsum(subscripts, x.reshape(b * t, *x.shape[2:]), w)
  return out.reshape(b, t, *out.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _shard_gradient(x, axes):
  """Identity whose gradient is constrained to the logical `axes` (the parameter's own sharding)."""
  return x


def _shard_gradient_fwd(x, axes):
  del axes
  return x, None


def _shard_gradient_bwd(axes, _, g):
  return (_constrain(g, axes),)


_shard_gradient.defvjp(_shard_gradient_fwd, _shard_gradient_bwd)


def _project(module, name, subscripts, x, shape, axes):
  """x [B, T, ...] times the module's weight `name` (a projection of model/lora.py), created here with
  `shape` and logical `axes`: stored quantized when `module.lora` says so, and with a low-rank adapter
  added when it targets this weight (and `module.use_adapters`)."""
  cfg, lora = module.config, module.lora
  dtype = jnp.dtype(cfg.dtype)
  b, t = x.shape[:2]
  tokens = x.reshape(b * t, *x.shape[2:])  # see _token_einsum
  if lora.quantized:
    codes = _param(module, name, shape, axes, nn.initializers.zeros, lora_lib.QUANTIZED[lora.base_dtype])
    scale_shape, scale_axes = lora_lib.scale_shape_and_axes(name, shape, axes, lora.block_size)
    scale = _param(module, name + lora_lib.SCALE_SUFFIX, scale_shape, scale_axes,
                   nn.initializers.ones, 'float32')
    y = lora_lib.dequantized_einsum(subscripts, tokens, codes, scale, lora.base_dtype,
                                    lora_lib.block_axis(name), dtype)
  else:
    w = _param(module, name, shape, axes, nn.initializers.normal(cfg.init_std), cfg.param_dtype)
    y = jnp.einsum(subscripts, tokens, w.astype(dtype))
  if lora.targets_path('/'.join(module.path + (name,))) and module.use_adapters:
    (a_shape, a_axes), (b_shape, b_axes) = lora_lib.adapter_shapes(name, shape, axes, lora.rank)
    a = _param(module, name + '_lora_a', a_shape, a_axes, lora_lib.a_init(a_shape), 'float32')
    b_ = _param(module, name + '_lora_b', b_shape, b_axes, nn.initializers.zeros, 'float32')
    if lora.dropout and module.has_rng('dropout'):
      keep = jax.random.bernoulli(module.make_rng('dropout'), 1 - lora.dropout, tokens.shape)
      tokens = jnp.where(keep, tokens / (1 - lora.dropout), 0).astype(tokens.dtype)
    y = y + lora_lib.delta(subscripts, tokens, a, b_, lora.scale, dtype)
  return y.reshape(b, t, *y.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _embed(table, tokens, dtype):
  """Rows of `table` [V, D] for `tokens`, in `dtype`.

  The rows are gathered from a copy whose embed axis is whole on every device (as FSDP gathers any
  weight before use: gathering from an embed-sharded table leaves XLA no cheap way to a batch-sharded
  result), cast to `dtype` first so that the copy is half the size in bfloat16 (1 GiB, not 2, for a
  128k vocabulary). The gradient is summed in float32 even then (autodiff would sum it in `dtype`): a
  frequent token's row adds up hundreds of contributions per batch, which bfloat16 would round away.
  That costs memory in the backward pass (a [V, D] float32 buffer before the reduce-scatter: up to 2
  GiB for a 128k vocabulary at width 4096); the per-slice figures in docs/benchmarks.md include it.
  """
  table = _constrain(table.astype(dtype), ('vocab', None))
  return jnp.take(table, tokens, axis=0)


def _embed_fwd(table, tokens, dtype):
  return _embed(table, tokens, dtype), (table, tokens)


def _embed_bwd(dtype, residuals, g):
  del dtype
  table, tokens = residuals
  grad = jnp.zeros(table.shape, jnp.float32).at[tokens].add(g.astype(jnp.float32))
  # Reduce-scattered straight to the table's own sharding (not all-reduced whole).
  return _constrain(grad, ('vocab', 'embed')).astype(table.dtype), None


_embed.defvjp(_embed_fwd, _embed_bwd)


@jax.custom_vjp
def _unembed(hidden, w):
  """hidden [B, T, D] @ w [D, V] -> float32 logits. The backward pass takes the logits' gradient in the
  compute dtype, as every other matmul's (a TPU rounds float32 operands to bfloat16 anyway), so that
  the weight gradient is [D, V] in bfloat16, not float32: 1 GiB less for a 128k vocabulary."""
  return jnp.einsum('BTD,DV->BTV', hidden, w, preferred_element_type=jnp.float32)


def _unembed_fwd(hidden, w):
  return _unembed(hidden, w), (hidden, w)


def _unembed_bwd(residuals, g):
  hidden, w = residuals
  g = g.astype(hidden.dtype)
  b, t, d = hidden.shape
  dw = jnp.einsum('XD,XV->DV', hidden.reshape(b * t, d), g.reshape(b * t, -1))  # see _token_einsum
  return _token_einsum('XV,DV->XD', g, w), dw.astype(w.dtype)


_unembed.defvjp(_unembed_fwd, _unembed_bwd)


class RMSNorm(nn.Module):
  eps: float
  dtype: str
  param_dtype: str

  @nn.compact
  def __call__(self, x):
    scale = _param(self, 'scale', (x.shape[-1],), ('norm',), nn.initializers.ones, self.param_dtype)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return (x * scale.astype(jnp.float32)).astype(self.dtype)


def rope_inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
  """Rotary inverse frequencies [H/2], with Llama-3.1 scaling when `rope_scaling_factor` > 0."""
  exponents = np.arange(0, cfg.head_dim, 2, dtype=np.float32) / cfg.head_dim
  inv_freq = (1.0 / (cfg.rope_theta ** exponents)).astype(np.float32)
  if cfg.rope_scaling_factor > 0:
    # Long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated.
    factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_len = cfg.rope_original_max_len
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    inv_freq = np.where(is_medium, smoothed, scaled).astype(np.float32)
  return inv_freq


def apply_rope(x, positions, inv_freq):
  """Rotates [B, T, N, H] by position, "rotate half" layout (the Hugging Face convention)."""
  angles = positions.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq)[None, None, :]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


class DecodeStep(NamedTuple):
  """Decoding: the masks of model/attention.py's `decode_attention` that every layer of one call
  shares: which cache slots [B, T, S] (None: the call made the cache, empty) and which of the call's
  own tokens [B, T, T] each of the call's tokens attends to."""
  cached_mask: jax.Array | None
  new_mask: jax.Array


def _write(cached, new, axis: int, index):
  """`cached` with `new` written at `index` along `axis`: in place when `cached` is a loop carry and
  whatever reads it feeds `new` (unordered, XLA would copy the whole cache first)."""
  start = [0] * cached.ndim
  start[axis] = index
  return jax.lax.dynamic_update_slice(cached, new.astype(cached.dtype), start)


class Attention(nn.Module):
  """Grouped-query self-attention. With `decode`, the queries attend to the layer's key/value `cache`
  (keys [B, K, H, S], values [B, K, S, H]) and to the call's own tokens as `step` says, and the call
  returns (output, (its keys [B, K, H, T], its values [B, K, T, H])) for the caller to write into the
  cache after the layer has read it."""
  config: ModelConfig
  decode: bool = False
  lora: LoraConfig = LoraConfig()
  use_adapters: bool = True

  @nn.compact
  def __call__(self, x, segment_ids, positions, step: DecodeStep | None = None, cache=None):
    cfg = self.config
    d, n, k, h = cfg.embed_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    dtype = jnp.dtype(cfg.dtype)
    q = _project(self, 'q_proj', 'XD,DNH->XNH', x, (d, n, h), ('embed', 'heads', 'head_dim'))
    k_ = _project(self, 'k_proj', 'XD,DKH->XKH', x, (d, k, h), ('embed', 'kv_heads', 'head_dim'))
    v = _project(self, 'v_proj', 'XD,DKH->XKH', x, (d, k, h), ('embed', 'kv_heads', 'head_dim'))
    if cfg.qkv_bias:
      zeros = nn.initializers.zeros
      q = q + _param(self, 'q_bias', (n, h), ('heads', 'head_dim'), zeros, cfg.param_dtype).astype(dtype)
      k_ = k_ + _param(self, 'k_bias', (k, h), ('kv_heads', 'head_dim'), zeros, cfg.param_dtype).astype(dtype)
      v = v + _param(self, 'v_bias', (k, h), ('kv_heads', 'head_dim'), zeros, cfg.param_dtype).astype(dtype)
    q = _constrain(checkpoint_name(q, 'query_proj'), ('batch', 'length', 'act_heads', 'head_dim'))
    k_ = _constrain(checkpoint_name(k_, 'key_proj'), ('batch', 'length', 'act_kv_heads', 'head_dim'))
    v = _constrain(checkpoint_name(v, 'value_proj'), ('batch', 'length', 'act_kv_heads', 'head_dim'))
    if cfg.qk_norm:  # each head normalised over head_dim, one scale shared by all heads
      norm = functools.partial(RMSNorm, cfg.norm_eps, cfg.dtype, cfg.param_dtype)
      q, k_ = norm(name='q_norm')(q), norm(name='k_norm')(k_)

    inv_freq = rope_inverse_frequencies(cfg)
    q, k_ = apply_rope(q, positions, inv_freq), apply_rope(k_, positions, inv_freq)
    if self.decode:
      out = attention_lib.decode_attention(q, *cache, k_, v, step.cached_mask, step.new_mask)
      # + 0 * out: what is written then depends on the reads of the cache, so that XLA orders the
      # write after them and updates the cache in place.
      tie = 0 * out[:, :, :1, :1]
      new = ((k_ + tie).transpose(0, 2, 3, 1), (v + tie).transpose(0, 2, 1, 3))  # the cache's layouts
    else:
      out = attention_lib.get(cfg.attention, dtype)(q, k_, v, segment_ids, segment_ids)
    out = _constrain(checkpoint_name(out, 'attention_out'), ('batch', 'length', 'act_heads', 'head_dim'))
    # jnp.einsum contracts shared letters in alphabetical order: for N, H that is against the weight's
    # layout, and XLA transposes the weight (and the activation) to match, which decoding, reading
    # every weight every step, cannot afford. 'A' sorts first.
    subscripts = 'XAH,AHD->XD' if self.decode else 'XNH,NHD->XD'
    out = _project(self, 'o_proj', subscripts, out, (n, h, d), ('heads', 'head_dim', 'embed'))
    out = checkpoint_name(out, 'attention_proj')
    return (out, new) if self.decode else out


class Mlp(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""
  config: ModelConfig
  lora: LoraConfig = LoraConfig()
  use_adapters: bool = True

  @nn.compact
  def __call__(self, x):
    d, f = self.config.embed_dim, self.config.mlp_dim
    gate = _project(self, 'gate_proj', 'XD,DF->XF', x, (d, f), ('embed', 'mlp'))
    up = _project(self, 'up_proj', 'XD,DF->XF', x, (d, f), ('embed', 'mlp'))
    hidden = _constrain(checkpoint_name(nn.silu(gate) * up, 'mlp_hidden'), ('batch', 'length', 'act_mlp'))
    return _project(self, 'down_proj', 'XF,FD->XD', hidden, (f, d), ('mlp', 'embed'))


class DecoderLayer(nn.Module):
  """Pre-norm block. Returns (x, None) so that it can be the body of `nn.scan`; with `decode`,
  (x, what to cache) of the layer's `cache` and the call's `step` (see Attention)."""
  config: ModelConfig
  decode: bool = False
  lora: LoraConfig = LoraConfig()
  use_adapters: bool = True

  @nn.compact
  def __call__(self, x, segment_ids, positions, step: DecodeStep | None = None, cache=None):
    cfg = self.config
    norm = functools.partial(RMSNorm, cfg.norm_eps, cfg.dtype, cfg.param_dtype)
    x = _constrain(x, ('batch', 'length', 'act_embed'))
    attn = Attention(cfg, self.decode, self.lora, self.use_adapters, name='attn')
    if self.decode:
      out, cache = attn(norm(name='attn_norm')(x), segment_ids, positions, step, cache)
    else:
      out = attn(norm(name='attn_norm')(x), segment_ids, positions)
    x = x + out
    x = x + Mlp(cfg, self.lora, self.use_adapters, name='mlp')(norm(name='mlp_norm')(x))
    return _constrain(x, ('batch', 'length', 'act_embed')), cache


class Transformer(nn.Module):
  """tokens [B, T] (+ segment_ids, positions for packed rows) -> logits [B, T, V] in float32.

  With `decode=True` the same parameters run incrementally over a key/value cache (generation): the
  collection 'cache' (see `init_cache`), made empty by the call that initialises the model and sized
  by it, unless given; each call appends its tokens at the cache's `index`.
  With `lora` (model/lora.py), the projections carry low-rank adapters over a frozen, possibly
  quantized base; `use_adapters=False` runs the same parameters as the base alone (adapters off, no
  second copy of any weight: e.g. the reference model of preference tuning).
  """
  config: ModelConfig
  decode: bool = False
  lora: LoraConfig = LoraConfig()
  use_adapters: bool = True

  def setup(self):
    cfg = self.config
    init = nn.initializers.normal(cfg.init_std)
    self.token_embed = self.param(
        'token_embed', nn.with_logical_partitioning(init, ('vocab', 'embed')),
        (cfg.vocab_size, cfg.embed_dim), jnp.dtype(cfg.param_dtype))
    if not cfg.tie_embeddings:
      self.unembed = self.param(
          'unembed', nn.with_logical_partitioning(init, ('embed', 'vocab')),
          (cfg.embed_dim, cfg.vocab_size), jnp.dtype(cfg.param_dtype))
    layer = DecoderLayer
    if cfg.remat_policy != 'none' and not self.decode:
      # Inside a scan, XLA cannot CSE across iterations, so the CSE barrier is only needed unrolled.
      layer = nn.remat(layer, policy=remat.POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      self.layers = nn.scan(
          layer, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
          in_axes=(nn.broadcast, nn.broadcast) + ((nn.broadcast, 0) if self.decode else ()),
          length=cfg.n_layers,
          metadata_params={nn.PARTITION_NAME: 'layers'})(cfg, self.decode, self.lora, self.use_adapters,
                                                         name='layers')
    else:
      self.layers = [layer(cfg, self.decode, self.lora, self.use_adapters, name=f'layers_{i}')
                     for i in range(cfg.n_layers)]
    self.final_norm = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype)

  def __call__(self, tokens, segment_ids=None, positions=None):
    return self.logits(self.hidden_states(tokens, segment_ids, positions))

  def hidden_states(self, tokens, segment_ids=None, positions=None):
    """Final-norm outputs [B, T, D]: everything but the unembedding."""
    cfg = self.config
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = _embed(self.token_embed, tokens, jnp.dtype(cfg.dtype))
    x = _constrain(x, ('batch', 'length', 'act_embed'))
    if self.decode:
      x = self._decode_layers(x, segment_ids, positions)
    elif cfg.scan_layers:
      x, _ = self.layers(x, segment_ids, positions)
    else:
      for layer in self.layers:
        x, _ = layer(x, segment_ids, positions)
    return self.final_norm(x)

  def logits(self, hidden):
    """Unembeds [..., D] hidden states into float32 logits [..., V]."""
    dtype = jnp.dtype(self.config.dtype)
    # When the loss calls this once per sequence chunk (train/step.py), each call's weight gradient is
    # reduce-scattered to the weight's own sharding at once, so that the sum over chunks is kept
    # sharded: an unsharded float32 [D, V] accumulator is 2 GiB per device for a 128k vocabulary.
    if self.config.tie_embeddings:
      w = _shard_gradient(self.token_embed, ('vocab', 'embed')).astype(dtype).T
    else:
      w = _shard_gradient(self.unembed, ('embed', 'vocab')).astype(dtype)
    logits = _unembed(hidden.astype(dtype), w)
    return _constrain(logits, ('batch', 'length', 'act_vocab'))

  def _decode_layers(self, x, segment_ids, positions):
    """The layers over the 'cache' collection, this call's keys and values written into it."""
    cfg = self.config
    b, t = segment_ids.shape
    fresh = not self.has_variable('cache', 'index')
    if fresh:  # sized by this call, and nothing in it to attend to
      for name, value in init_cache(cfg, b, t).items():
        self.put_variable('cache', name, value)
    cache = {name: self.get_variable('cache', name) for name in ('key', 'value', 'segment_ids', 'index')}
    index = cache['index']
    segment_ids = segment_ids.astype(jnp.int32)
    # Written first, then read: in place.
    cached_segments = _write(cache['segment_ids'], segment_ids, 1, index)
    step = DecodeStep(
        None if fresh else ((segment_ids[:, :, None] == cached_segments[:, None, :])
                            & (jnp.arange(cached_segments.shape[1]) < index)),
        (segment_ids[:, :, None] == segment_ids[:, None, :]) & np.tril(np.ones((t, t), bool)))
    if cfg.scan_layers:
      x, (k, v) = self.layers(x, segment_ids, positions, step, (cache['key'], cache['value']))
      keys, values = _write(cache['key'], k, 4, index), _write(cache['value'], v, 3, index)
    else:
      keys, values = [], []
      for layer, cached_k, cached_v in zip(self.layers, cache['key'], cache['value']):
        x, (k, v) = layer(x, segment_ids, positions, step, (cached_k, cached_v))
        keys.append(_write(cached_k, k, 3, index))
        values.append(_write(cached_v, v, 2, index))
      keys, values = tuple(keys), tuple(values)
    if not self.is_initializing():  # initialising leaves the cache empty
      lead = (None,) if cfg.scan_layers else ()
      constrain = lambda tree, axes: jax.tree.map(lambda x: _constrain(x, lead + axes), tree)
      self.put_variable('cache', 'key', constrain(keys, ('batch', 'act_kv_heads', 'head_dim', None)))
      self.put_variable('cache', 'value', constrain(values, ('batch', 'act_kv_heads', None, 'head_dim')))
      self.put_variable('cache', 'segment_ids', cached_segments)
      self.put_variable('cache', 'index', index + t)
    return x


def init_cache(cfg: ModelConfig, batch: int, length: int) -> dict:
  """An empty key/value cache of `length` slots per row, for `Transformer(cfg, decode=True)`.

  `key` [B, K, H, S] and `value` [B, K, S, H] in the compute dtype, per layer: stacked on a leading
  layers axis under the layer scan, else a tuple of one array per layer (on a CPU a slice of a
  stacked array read by a matmul is copied first, every step). `segment_ids` [B, S]: each slot's
  segment, 0 for an empty slot or padding, which no real token attends to. `index`: the next free
  slot.
  """
  dtype = jnp.dtype(cfg.dtype)
  k_shape = (batch, cfg.n_kv_heads, cfg.head_dim, length)
  v_shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)
  if cfg.scan_layers:
    keys = jnp.zeros((cfg.n_layers,) + k_shape, dtype)
    values = jnp.zeros((cfg.n_layers,) + v_shape, dtype)
  else:
    keys = tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.n_layers))
    values = tuple(jnp.zeros(v_shape, dtype) for _ in range(cfg.n_layers))
  return {'key': keys, 'value': values, 'segment_ids': jnp.zeros((batch, length), jnp.int32),
          'index': jnp.zeros((), jnp.int32)}


def grow_cache(cache: dict, length: int) -> dict:
  """The cache with empty slots appended up to `length` (a copy: once per growth, not per step)."""
  extra = length - cache['segment_ids'].shape[1]
  if extra < 0:
    raise ValueError(f'cannot shrink a cache of {cache["segment_ids"].shape[1]} slots to {length}')

  def pad(x, axis):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)

  return {'key': jax.tree.map(lambda x: pad(x, x.ndim - 1), cache['key']),
          'value': jax.tree.map(lambda x: pad(x, x.ndim - 2), cache['value']),
          'segment_ids': pad(cache['segment_ids'], 1), 'index': cache['index']}


def init_params(cfg: ModelConfig, rng, lora: LoraConfig = LoraConfig()):
  """Freshly initialised parameters, each leaf still boxed with its logical axes
  (flax LogicallyPartitioned): the one place the parameter tree is built. With `lora`, the adapters
  too, and the base as `lora.base_dtype` stores it."""
  return Transformer(cfg, lora=lora).init(rng, jnp.zeros((1, 8), jnp.int32))['params']


def abstract_params(cfg: ModelConfig, boxed: bool = False, lora: LoraConfig = LoraConfig()):
  """The parameter tree as ShapeDtypeStructs, computing nothing; `boxed` keeps the logical axes."""
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), lora))
  return shapes if boxed else nn.meta.unbox(shapes)


def count_params(cfg: ModelConfig) -> int:
  return sum(x.size for x in jax.tree.leaves(abstract_params(cfg)))

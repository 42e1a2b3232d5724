"""Causal, segment-aware grouped-query attention kernels, selected by name.

Every implementation takes queries [B, T, N, H] and keys/values [B, S, K, H] (N query heads share K
key/value heads) plus segment ids, and returns [B, T, N, H]. A query attends to a key when both carry
the same segment id and the key is not in the query's future. Segment id 0 marks padding.

  xla      the reference: plain einsums over the whole [T, S] score matrix, softmax in float32.
  chunked  XLA ops, flash-style: query chunks skip the key blocks entirely in their future, and the
           backward pass recomputes scores from (q, k, lse) instead of storing [T, S] probabilities.
           The default on CPU, and the fallback wherever no fused kernel applies.
  splash   the Pallas TPU splash-attention kernel (runs in Pallas interpret mode off TPU, for tests).
  cudnn    `jax.nn.dot_product_attention(implementation='cudnn')`: cuDNN flash attention on NVIDIA
           GPUs, bf16/fp16 only.
  auto     picks by the platform the step is compiled for: splash on TPU, cudnn on GPU (chunked
           there in float32), chunked on CPU.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_MASK_VALUE = float(np.finfo(np.float32).min)


def attention_mask(q_segment_ids, kv_segment_ids, q_offset=0):
  """[B, T, S] boolean mask: same segment, and key index <= query index (+ offset, for decoding)."""
  t, s = q_segment_ids.shape[1], kv_segment_ids.shape[1]
  same_segment = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  q_index = jnp.arange(t)[None, :, None] + jnp.asarray(q_offset).reshape(-1, 1, 1)
  causal = q_index >= jnp.arange(s)[None, None, :]
  return same_segment & causal


def xla_attention(q, k, v, q_segment_ids, kv_segment_ids, q_offset=0):
  """Reference implementation: plain einsums, softmax in float32."""
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  # Group query heads under their shared key/value head rather than repeating K and V in memory, and
  # put heads before time: the [T, S] matmuls then read contiguous rows (2x faster on CPU).
  q = q.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  logits = jnp.einsum('BKGTH,BKSH->BKGTS', q, k, preferred_element_type=jnp.float32) * h ** -0.5
  mask = attention_mask(q_segment_ids, kv_segment_ids, q_offset)[:, None, None, :, :]
  # A large finite negative keeps fully-masked rows (padding) free of NaNs.
  logits = jnp.where(mask, logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum('BKGTS,BKSH->BKGTH', probs, v)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def decode_attention(q, cached_keys, cached_values, k, v, cached_mask, new_mask):
  """Decoding: the queries [B, T, N, H] of a call's tokens attend to the key/value cache, keys
  [B, K, H, S] (slots last: a query's scores are a vector-matrix product over contiguous rows) and
  values [B, K, S, H], as `cached_mask` [B, T, S] says (None: the cache is empty), and to the call's
  own keys and values [B, T, K, H], not in the cache yet, as `new_mask` [B, T, T] says. One softmax
  over both, in float32.
  """
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
  scale = h ** -0.5
  new = jnp.einsum('BKGTH,BKUH->BKGTU', q, k, preferred_element_type=jnp.float32)
  logits = jnp.where(new_mask[:, None, None], new * scale, _MASK_VALUE)
  slots = 0
  if cached_mask is not None:
    slots = cached_keys.shape[-1]
    cached = jnp.einsum('BKGTH,BKHS->BKGTS', q, cached_keys, preferred_element_type=jnp.float32)
    logits = jnp.concatenate([jnp.where(cached_mask[:, None, None], cached * scale, _MASK_VALUE),
                              logits], axis=-1)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum('BKGTU,BKUH->BKGTH', probs[..., slots:], v)
  if cached_mask is not None:
    out = out + jnp.einsum('BKGTS,BKSH->BKGTH', probs[..., :slots], cached_values)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


# ---------------------------------------------------------------------------------------------------
# chunked: causal block skipping and a recomputing backward pass, in plain XLA.

# Query rows per chunk. Chunk i reads keys [0, end of chunk i): with c chunks the score matrices cover
# (c + 1) / 2c of [T, S] (62% for 4 chunks) instead of all of it. Longer sequences get longer chunks,
# at most MAX_CHUNKS of them, so that the unrolled program stays small.
CHUNK = 64
MAX_CHUNKS = 16


def _chunks(t: int, chunk: int) -> list[tuple[int, int]]:
  chunk = max(chunk, -(-t // MAX_CHUNKS))
  return [(a, min(a + chunk, t)) for a in range(0, t, chunk)]


def _chunk_scores(q, k, q_seg, kv_seg, start, scale):
  """Masked float32 scores of the query rows [start, start + tq) against keys [0, S') ([B,K,G,tq,S'])."""
  s = jnp.einsum('BKGTH,BKSH->BKGTS', q, k, preferred_element_type=jnp.float32) * scale
  tq, sk = q.shape[3], k.shape[2]
  causal = (start + np.arange(tq))[:, None] >= np.arange(sk)[None, :]  # static: no per-step work
  mask = (q_seg[:, :, None] == kv_seg[:, None, :]) & causal
  return jnp.where(mask[:, None, None], s, _MASK_VALUE)


def _chunked_forward(q, k, v, q_seg, kv_seg, chunk):
  """q [B,K,G,T,H], k/v [B,K,S,H] -> out [B,K,G,T,H], log-sum-exp [B,K,G,T] (float32)."""
  scale = q.shape[-1] ** -0.5
  outs, lses = [], []
  for start, end in _chunks(q.shape[3], chunk):
    s = _chunk_scores(q[:, :, :, start:end], k[:, :, :end], q_seg[:, start:end], kv_seg[:, :end],
                      start, scale)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    outs.append(jnp.einsum('BKGTS,BKSH->BKGTH', (p / l).astype(v.dtype), v[:, :, :end]))
    lses.append((m + jnp.log(l))[..., 0])
  return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _chunked_core(q, k, v, q_seg, kv_seg, chunk):
  return _chunked_forward(q, k, v, q_seg, kv_seg, chunk)[0]


def _chunked_core_fwd(q, k, v, q_seg, kv_seg, chunk):
  out, lse = _chunked_forward(q, k, v, q_seg, kv_seg, chunk)
  return out, (q, k, v, q_seg, kv_seg, out, lse)


def _chunked_core_bwd(chunk, residuals, d_out):
  q, k, v, q_seg, kv_seg, out, lse = residuals
  scale = q.shape[-1] ** -0.5
  # softmax backward: dS = P * (dP - rowsum(dO * O)).
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  dq_chunks = []
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  for start, end in _chunks(q.shape[3], chunk):
    q_c, do_c = q[:, :, :, start:end], d_out[:, :, :, start:end]
    s = _chunk_scores(q_c, k[:, :, :end], q_seg[:, start:end], kv_seg[:, :end], start, scale)
    p = jnp.exp(s - lse[:, :, :, start:end, None])
    dp = jnp.einsum('BKGTH,BKSH->BKGTS', do_c, v[:, :, :end], preferred_element_type=jnp.float32)
    ds = (p * (dp - delta[:, :, :, start:end, None]) * scale).astype(q.dtype)
    dq_chunks.append(jnp.einsum('BKGTS,BKSH->BKGTH', ds, k[:, :, :end]))
    dk = dk.at[:, :, :end].add(
        jnp.einsum('BKGTS,BKGTH->BKSH', ds, q_c, preferred_element_type=jnp.float32))
    dv = dv.at[:, :, :end].add(
        jnp.einsum('BKGTS,BKGTH->BKSH', p.astype(v.dtype), do_c, preferred_element_type=jnp.float32))
  return jnp.concatenate(dq_chunks, axis=3), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_chunked_core.defvjp(_chunked_core_fwd, _chunked_core_bwd)


def chunked_attention(q, k, v, q_segment_ids, kv_segment_ids, chunk: int | None = None):
  """Self-attention (T == S, queries and keys at the same positions) in causal query chunks of `chunk`
  rows (default CHUNK), longer where that would make more than MAX_CHUNKS chunks."""
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  if k.shape[1] != t:
    raise ValueError(f'chunked attention is for self-attention (T == S), got T={t}, S={k.shape[1]}; '
                     'decoding uses xla_attention')
  q = q.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  out = _chunked_core(q, k, v, q_segment_ids, kv_segment_ids, chunk or CHUNK)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


# ---------------------------------------------------------------------------------------------------
# splash: the Pallas TPU kernel, under shard_map so that each device runs it on its own shard.

# Tile sizes (MaxText's defaults for v4/v5); clipped to the sequence length.
SPLASH_BLOCK = 512


@functools.lru_cache(maxsize=32)
def _splash_kernel(n_heads: int, t: int, s: int, block: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=import-outside-toplevel
      splash_attention_kernel as splash, splash_attention_mask as splash_mask)
  bq, bkv = min(block, t), min(block, s)
  for name, length, b in (('query', t, bq), ('key', s, bkv)):
    if length % b or b % 128:
      raise ValueError(f'splash attention needs the {name} length ({length}) to be a multiple of 128 '
                       f'and of its block ({b}); pad train.seq_len or use model.attention=chunked')
  sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                            block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                            block_q_dq=bq, block_kv_dq=bkv)
  mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((t, s)) for _ in range(n_heads)])
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)


def _splash_local(q, k, v, q_segment_ids, kv_segment_ids, interpret):
  """One device's shard: q [B, T, N, H], k/v [B, S, K, H] -> [B, T, N, H]."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=import-outside-toplevel
      splash_attention_kernel as splash)
  h = q.shape[-1]
  # The kernel takes heads-major [N, T, H] per sequence and does not scale the scores itself.
  q = (q.astype(jnp.float32) * h ** -0.5).astype(q.dtype).transpose(0, 2, 1, 3)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  kernel = _splash_kernel(q.shape[1], q.shape[2], k.shape[2], SPLASH_BLOCK, interpret)
  segment_ids = splash.SegmentIds(q=q_segment_ids.astype(jnp.int32),
                                  kv=kv_segment_ids.astype(jnp.int32))
  out = jax.vmap(kernel)(q, k, v, segment_ids=segment_ids)
  return out.transpose(0, 2, 1, 3)


def splash_attention(q, k, v, q_segment_ids, kv_segment_ids, interpret: bool | None = None):
  """Pallas splash attention. Under a mesh, runs per device over batch and head shards (shard_map),
  with specs from the active logical-axis rules; sequence sharding is not supported."""
  if interpret is None:
    interpret = target_platform() != 'tpu'
  local = functools.partial(_splash_local, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q, k, v, q_segment_ids, kv_segment_ids)
  q_spec = nn.logical_to_mesh_axes(('batch', 'length', 'act_heads', 'head_dim'))
  kv_spec = nn.logical_to_mesh_axes(('batch', 'length', 'act_kv_heads', 'head_dim'))
  seg_spec = nn.logical_to_mesh_axes(('batch', 'length'))
  if q_spec[1] is not None:
    raise ValueError('splash attention does not support a sharded sequence (length) axis')
  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
                       out_specs=q_spec, check_vma=False)(q, k, v, q_segment_ids, kv_segment_ids)


# ---------------------------------------------------------------------------------------------------
# cudnn: jax.nn.dot_product_attention. `implementation` is 'cudnn' on GPU; tests pass 'xla' or None
# to run the same call (mask construction, layout, GQA) through JAX's XLA path on CPU.

def cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids, implementation: str | None = 'cudnn'):
  if implementation == 'cudnn' and q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f'cudnn attention needs bfloat16 or float16 activations, got {q.dtype}; set '
                     'model.dtype=bfloat16 or model.attention=chunked')
  # Segments as a boolean [B, 1, T, S] mask (cuDNN applies it as a bias); causality as cuDNN's own
  # causal mask, which also lets it skip the blocks above the diagonal.
  same_segment = q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]
  return jax.nn.dot_product_attention(q, k, v, mask=same_segment, is_causal=True,
                                      implementation=implementation)


# ---------------------------------------------------------------------------------------------------

IMPLEMENTATIONS = {
    'xla': xla_attention,
    'chunked': chunked_attention,
    'splash': splash_attention,
    'cudnn': cudnn_attention,
}
# What model.attention may name: an implementation, or 'auto' (picked per platform by `resolve`).
NAMES = ('auto', *IMPLEMENTATIONS)


def target_platform() -> str:
  """The platform being compiled for: the mesh's devices' when tracing under one (which may be a TPU
  topology compiled from a CPU host), else JAX's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, 'abstract_device', None)
  return device.platform if device is not None else jax.default_backend()


def resolve(name: str, platform: str | None = None, dtype=jnp.float32) -> str:
  """The implementation that `name` stands for on `platform` ('auto' picks; others are themselves)."""
  if name != 'auto':
    return name
  platform = platform or target_platform()
  if platform == 'tpu':
    return 'splash'
  if platform in ('gpu', 'cuda') and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return 'cudnn'
  return 'chunked'


def get(name: str, dtype=jnp.float32):
  name = resolve(name, dtype=dtype)
  if name not in IMPLEMENTATIONS:
    raise ValueError(f'Unknown attention implementation {name!r}; known: {sorted(IMPLEMENTATIONS)}')
  return IMPLEMENTATIONS[name]

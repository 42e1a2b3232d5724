"""Causal, segment-aware grouped-query attention kernels, selected by name.

Every implementation takes queries [B, T, N, H] and keys/values [B, S, K, H] (N query heads share K
key/value heads) plus segment ids, and returns [B, T, N, H]. A query attends to a key when both carry
the same segment id and the key is not in the query's future. Segment id 0 marks padding.
"""

import jax
import jax.numpy as jnp


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
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum('BKGTS,BKSH->BKGTH', probs, v)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


IMPLEMENTATIONS = {
    'xla': xla_attention,
}


def get(name: str):
  if name not in IMPLEMENTATIONS:
    raise ValueError(f'Unknown attention implementation {name!r}; known: {sorted(IMPLEMENTATIONS)}')
  return IMPLEMENTATIONS[name]

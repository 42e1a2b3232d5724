"""Packing token streams into fixed-length rows with segment ids and positions (inside tf.data).

A row is three [T] vectors: `tokens`, `starts` (1 where a document begins) and `valid` (0 on padding).
`row_features` turns a batch of rows into the train step's batch: inputs, targets, segment_ids
(1, 2, ... per document in the row, 0 on padding), positions (restarting at each segment) and
loss_weights (1 where the target is the next token of the same segment).
"""

import numpy as np
import tensorflow as tf

ROW_SPEC = {
    'tokens': tf.TensorSpec([None], tf.int32),
    'starts': tf.TensorSpec([None], tf.int32),
    'valid': tf.TensorSpec([None], tf.int32),
}


def token_chunks(texts_to_ids, docs: tf.data.Dataset, docs_per_chunk: int = 256) -> tf.data.Dataset:
  """Documents -> chunks {tokens, starts, valid} of many documents' tokens laid end to end.

  `texts_to_ids(list[bytes]) -> list[list[int]]` runs in Python (any tokenizer), batched so that the
  per-call overhead is paid once per `docs_per_chunk` documents.
  """
  def encode(texts):
    ids = texts_to_ids(list(texts))
    lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
    tokens = np.fromiter((t for x in ids for t in x), np.int32, int(lengths.sum()))
    starts = np.zeros_like(tokens)
    starts[np.cumsum(lengths)[:-1]] = 1
    if len(tokens):
      starts[0] = 1
    return tokens, starts

  def to_chunk(texts):
    tokens, starts = tf.numpy_function(encode, [texts], (tf.int32, tf.int32), stateful=False)
    tokens.set_shape([None])
    starts.set_shape([None])
    return {'tokens': tokens, 'starts': starts, 'valid': tf.ones_like(tokens)}

  return docs.batch(docs_per_chunk).map(to_chunk, num_parallel_calls=tf.data.AUTOTUNE,
                                        deterministic=True)


def concat_and_split(chunks: tf.data.Dataset, seq_len: int, flush: bool) -> tf.data.Dataset:
  """Lays chunks end to end and cuts rows of `seq_len` tokens; a document may continue into the next
  row (as a new segment there). With `flush`, the final partial row is padded and kept, so that a
  finite stream loses no token.
  """
  if flush:
    last = {k: tf.zeros([0], tf.int32) for k in ROW_SPEC}
    chunks = chunks.map(lambda c: (c, False)).concatenate(
        tf.data.Dataset.from_tensors((last, True)))
  else:
    chunks = chunks.map(lambda c: (c, False))

  def cut(carry, chunk_and_is_last):
    chunk, is_last = chunk_and_is_last
    joined = {k: tf.concat([carry[k], chunk[k]], 0) for k in ROW_SPEC}
    n = tf.shape(joined['tokens'])[0]
    pad = tf.where(is_last, (seq_len - n % seq_len) % seq_len, 0)
    joined = {k: tf.pad(v, [[0, pad]]) for k, v in joined.items()}
    rows = (n + pad) // seq_len
    cut_at = rows * seq_len
    out = {k: tf.reshape(v[:cut_at], [rows, seq_len]) for k, v in joined.items()}
    return {k: v[cut_at:] for k, v in joined.items()}, out

  init = {k: tf.zeros([0], tf.int32) for k in ROW_SPEC}
  return chunks.scan(init, cut).unbatch()


def row_features(rows: dict[str, tf.Tensor], pad_id: int = 0) -> dict[str, tf.Tensor]:
  """[B, T] rows -> the train step's batch (see module docstring)."""
  tokens, starts, valid = rows['tokens'], rows['starts'], rows['valid']
  b, t = tf.shape(tokens)[0], tf.shape(tokens)[1]
  # A row that begins mid-document gets segment 1 for that fragment; each document start adds one.
  first_is_start = starts[:, :1]
  segments = tf.cumsum(starts, axis=1) + (1 - first_is_start)
  # Position = index - index where the token's segment begins. Segments are sorted within a row, so
  # offsetting them by row makes one sorted id space for a single segment_min over the whole batch.
  index = tf.broadcast_to(tf.range(t), [b, t])
  global_segment = segments + tf.range(b)[:, None] * (t + 1)
  segment_begin = tf.math.unsorted_segment_min(tf.reshape(index, [-1]), tf.reshape(global_segment, [-1]),
                                               b * (t + 1))
  positions = (index - tf.gather(segment_begin, global_segment)) * valid
  segment_ids = segments * valid
  targets = tf.concat([tokens[:, 1:], tf.fill([b, 1], pad_id)], axis=1)
  next_segment = tf.concat([segment_ids[:, 1:], tf.zeros([b, 1], tf.int32)], axis=1)
  loss_weights = tf.cast((next_segment == segment_ids) & (segment_ids > 0), tf.float32)
  return {
      'inputs': tf.where(valid > 0, tokens, pad_id),
      'targets': targets,
      'segment_ids': segment_ids,
      'positions': positions,
      'loss_weights': loss_weights,
  }

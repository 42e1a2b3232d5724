"""Packing token streams into fixed-length rows with segment ids and positions (inside tf.data).

A row is four [T] vectors: `tokens`, `starts` (1 where a document begins), `valid` (0 on padding) and
`trainable` (1 on tokens the model must learn to produce; all valid tokens when pretraining).
`row_features` turns a batch of rows into the train step's batch: inputs, targets, segment_ids
(1, 2, ... per document in the row, 0 on padding), positions (restarting at each segment) and
loss_weights (1 where the target is the next token of the same segment and is trainable).

Two packers: `concat_and_split` (pretraining: documents laid end to end, cut every T tokens) and
`pack_examples` (instruction tuning: whole examples, greedily, never split across rows).
"""

import numpy as np
import tensorflow as tf

ROW_KEYS = ('tokens', 'starts', 'valid', 'trainable')


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
    ones = tf.ones_like(tokens)
    return {'tokens': tokens, 'starts': starts, 'valid': ones, 'trainable': ones}

  return docs.batch(docs_per_chunk).map(to_chunk, num_parallel_calls=tf.data.AUTOTUNE,
                                        deterministic=True)


def concat_and_split(chunks: tf.data.Dataset, seq_len: int, flush: bool) -> tf.data.Dataset:
  """Lays chunks end to end and cuts rows of `seq_len` tokens; a document may continue into the next
  row (as a new segment there). With `flush`, the final partial row is padded and kept, so that a
  finite stream loses no token.
  """
  chunks = _mark_last(chunks, flush)

  def cut(carry, chunk_and_is_last):
    chunk, is_last = chunk_and_is_last
    joined = {k: tf.concat([carry[k], chunk[k]], 0) for k in ROW_KEYS}
    n = tf.shape(joined['tokens'])[0]
    pad = tf.where(is_last, (seq_len - n % seq_len) % seq_len, 0)
    joined = {k: tf.pad(v, [[0, pad]]) for k, v in joined.items()}
    rows = (n + pad) // seq_len
    cut_at = rows * seq_len
    out = {k: tf.reshape(v[:cut_at], [rows, seq_len]) for k, v in joined.items()}
    return {k: v[cut_at:] for k, v in joined.items()}, out

  return chunks.scan(_empty_row(), cut).unbatch()


def _empty_row(spec=None):
  """A row of no tokens, with the keys and dtypes of `spec` (a row dataset's element_spec)."""
  if spec is None:
    return {k: tf.zeros([0], tf.int32) for k in ROW_KEYS}
  return {k: tf.zeros([0], s.dtype) for k, s in spec.items()}


def _mark_last(ds: tf.data.Dataset, flush: bool) -> tf.data.Dataset:
  """(element, False) for each element, then, with `flush`, one empty (element, True) sentinel."""
  empty = _empty_row(ds.element_spec)
  ds = ds.map(lambda x: (x, False))
  if flush:
    ds = ds.concatenate(tf.data.Dataset.from_tensors((empty, True)))
  return ds


def example_rows(examples: tf.data.Dataset) -> tf.data.Dataset:
  """{tokens, trainable} examples (variable length) -> unpadded rows of one example each."""
  def to_row(ex):
    ones = tf.ones_like(ex['tokens'])
    starts = tf.concat([[1], tf.zeros_like(ex['tokens'])[1:]], 0)
    return {'tokens': ex['tokens'], 'starts': starts, 'valid': ones, 'trainable': ex['trainable']}
  return examples.map(to_row)


def pad_rows(rows: tf.data.Dataset, seq_len: int) -> tf.data.Dataset:
  """Pads each row to `seq_len` (valid = 0 on the padding). Rows must not be longer."""
  return rows.map(lambda r: {k: tf.pad(v, [[0, seq_len - tf.shape(v)[0]]]) for k, v in r.items()})


def pack_examples(rows: tf.data.Dataset, seq_len: int, flush: bool) -> tf.data.Dataset:
  """Greedy packing of whole examples (rows from `example_rows`, each at most `seq_len` long) into
  rows of `seq_len`: an example that does not fit in the current row starts the next one. Rows come
  out padded. With `flush`, the last partial row of a finite stream is kept. Per-token keys besides
  ROW_KEYS (those of preference pairs) are packed alongside.
  """
  keys = list(rows.element_spec)

  def add(carry, row_and_is_last):
    row, is_last = row_and_is_last
    used, incoming = tf.shape(carry['tokens'])[0], tf.shape(row['tokens'])[0]
    emit = (used > 0) & ((used + incoming > seq_len) | is_last)
    joined = {k: tf.concat([carry[k], row[k]], 0) for k in keys}
    out = {k: tf.pad(carry[k], [[0, seq_len - used]]) for k in keys}
    new_carry = {k: tf.cond(emit & ~is_last, lambda k=k: row[k], lambda k=k: joined[k]) for k in keys}
    return new_carry, (out, emit)

  def is_emitted(row, emit):
    del row
    return emit

  def drop_flag(row, emit):
    del emit
    return row

  return _mark_last(rows, flush).scan(_empty_row(rows.element_spec), add).filter(is_emitted).map(drop_flag)


def row_features(rows: dict[str, tf.Tensor], pad_id: int = 0) -> dict[str, tf.Tensor]:
  """[B, T] rows -> the train step's batch (see module docstring). Keys other than ROW_KEYS (a
  mixture's per-row `source`) pass through."""
  tokens, starts, valid, trainable = rows['tokens'], rows['starts'], rows['valid'], rows['trainable']
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
  next_trainable = tf.concat([trainable[:, 1:], tf.zeros([b, 1], tf.int32)], axis=1)
  loss_weights = tf.cast((next_segment == segment_ids) & (segment_ids > 0) & (next_trainable > 0),
                         tf.float32)
  return {
      'inputs': tf.where(valid > 0, tokens, pad_id),
      'targets': targets,
      'segment_ids': segment_ids,
      'positions': positions,
      'loss_weights': loss_weights,
      **{k: v for k, v in rows.items() if k not in ROW_KEYS},
  }

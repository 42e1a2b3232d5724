"""The train step's batch: the one format every input pipeline produces and the step consumes.

A batch is a dict of [B, T] arrays, B rows of T tokens:
  inputs        token ids the model reads
  targets       the next token at each position, the one it must predict
  segment_ids   1, 2, ... per document (or example) packed in the row, 0 on padding: tokens attend only
                within their segment
  positions     position of each token within its segment (rotary embeddings)
  loss_weights  1 where the target counts in the loss (pretraining: every next token of the same
                document; instruction tuning: only answer tokens), else 0
Numpy only: the GPU benchmark image has no TensorFlow.
"""

import numpy as np

BATCH_KEYS = {'inputs': np.int32, 'targets': np.int32, 'segment_ids': np.int32, 'positions': np.int32,
              'loss_weights': np.float32}


def empty_batch(batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
  """All padding: segment 0 everywhere, no loss weight (a batch that changes no sum)."""
  return {k: np.zeros((batch_size, seq_len), dtype) for k, dtype in BATCH_KEYS.items()}


def pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """Pads a short final batch with all-padding rows up to `batch_size` rows."""
  n, seq_len = batch['inputs'].shape
  if n == batch_size:
    return batch
  padding = empty_batch(batch_size - n, seq_len)
  return {k: np.concatenate([v, padding[k].astype(v.dtype)]) for k, v in batch.items()}

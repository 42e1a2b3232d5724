"""The train step's batch: the one format every input pipeline produces and the step consumes.

A batch is a dict of [B, T] arrays, B rows of T tokens:
  inputs        token ids the model reads
  targets       the next token at each position, the one it must predict
  segment_ids   1, 2, ... per document (or example) packed in the row, 0 on padding: tokens attend only
                within their segment
  positions     position of each token within its segment (rotary embeddings)
  loss_weights  1 where the target counts in the loss (pretraining: every next token of the same
                document; instruction tuning: only answer tokens), else 0
Preference pairs (data/preference.py, for the 'dpo' objective of train/step.py) are packed as two
segments each, the prompt followed by the chosen completion, then the prompt followed by the
rejected one (loss weight on the completions only), and add PREFERENCE_KEYS:
  pair_ids      1, 2, ... per pair in the row (both of its segments), 0 on padding
  chosen        1 on the tokens of a pair's chosen segment, 0 on its rejected segment and on padding
  ref_logps     with reference log-probabilities computed before training (dpo.reference =
                'precompute'): the reference model's log-probability of each segment's completion, on
                the segment's first token (0 elsewhere), so that it sums over a segment like the
                policy's per-token log-probabilities
Numpy only: the GPU benchmark image has no TensorFlow.
"""

import numpy as np

BATCH_KEYS = {'inputs': np.int32, 'targets': np.int32, 'segment_ids': np.int32, 'positions': np.int32,
              'loss_weights': np.float32}
PREFERENCE_KEYS = {'pair_ids': np.int32, 'chosen': np.int32}
REFERENCE_KEYS = {'ref_logps': np.float32}


def batch_keys(preference: bool = False, reference: bool = False) -> dict[str, type]:
  """The keys (and dtypes) of a batch: of preference pairs, with precomputed reference log-probs."""
  return {**BATCH_KEYS, **(PREFERENCE_KEYS if preference else {}), **(REFERENCE_KEYS if reference else {})}


def max_pairs(seq_len: int) -> int:
  """The most preference pairs a row can hold: each segment has at least one prompt token and one
  completion token (data/preference.py drops any other)."""
  return seq_len // 4


def empty_batch(batch_size: int, seq_len: int, keys: dict[str, type] = BATCH_KEYS) -> dict[str, np.ndarray]:
  """All padding: segment 0 everywhere, no loss weight (a batch that changes no sum)."""
  return {k: np.zeros((batch_size, seq_len), dtype) for k, dtype in keys.items()}


def empty_like(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """An all-padding batch with the keys, shapes and dtypes of `batch`."""
  return {k: np.zeros_like(v) for k, v in batch.items()}


def pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """Pads a short final batch with all-padding rows up to `batch_size` rows."""
  n, seq_len = batch['inputs'].shape
  if n == batch_size:
    return batch
  padding = empty_batch(batch_size - n, seq_len, {k: v.dtype for k, v in batch.items()})
  return {k: np.concatenate([v, padding[k]]) for k, v in batch.items()}

"""Synthetic batches (numpy only, no TensorFlow) for benchmarks and multi-host checks.

The global batch of step s is a pure function of (seed, s); each host takes its own rows, so the
global batch is the same whatever the number of hosts. Rows hold a few packed documents of
arithmetic token sequences: learnable, so a falling loss shows that training works.
"""

import numpy as np

from data.batch import BATCH_KEYS, batch_keys


def synthetic_global_batch(seed: int, step: int, batch_size: int, seq_len: int, vocab_size: int,
                           docs_per_row: int = 2) -> dict[str, np.ndarray]:
  rng = np.random.default_rng([seed, step])
  index = np.arange(seq_len)
  # Document boundaries: `docs_per_row` segments of random lengths per row.
  cuts = np.sort(rng.integers(1, seq_len, size=(batch_size, docs_per_row - 1)), axis=1)
  segment_ids = 1 + (index[None, :, None] >= cuts[:, None, :]).sum(-1)
  starts = np.concatenate([np.zeros((batch_size, 1), np.int64), cuts], axis=1)
  segment_begin = np.take_along_axis(starts, segment_ids - 1, axis=1)
  positions = index[None, :] - segment_begin
  first = rng.integers(3, vocab_size, size=(batch_size, docs_per_row))
  stride = rng.integers(1, 7, size=(batch_size, docs_per_row))
  seg = segment_ids - 1
  tokens = (np.take_along_axis(first, seg, 1) + np.take_along_axis(stride, seg, 1) * positions)
  tokens = 3 + tokens % (vocab_size - 3)
  same_next = np.concatenate([segment_ids[:, 1:] == segment_ids[:, :-1],
                              np.zeros((batch_size, 1), bool)], axis=1)
  batch = {
      'inputs': tokens,
      'targets': np.concatenate([tokens[:, 1:], np.zeros((batch_size, 1), tokens.dtype)], 1),
      'segment_ids': segment_ids,
      'positions': positions,
      'loss_weights': same_next,
  }
  return {k: batch[k].astype(dtype) for k, dtype in BATCH_KEYS.items()}


def synthetic_preference_batch(seed: int, step: int, batch_size: int, seq_len: int, vocab_size: int,
                               reference: bool = False, pairs_per_row: int = 2) -> dict[str, np.ndarray]:
  """Preference pairs in the layout of data/preference.py, for benchmarks and compiles: each row holds
  `pairs_per_row` pairs of two equal segments (chosen, rejected) of random tokens, the second half of
  each segment its completion; with `reference`, made-up reference log-probabilities."""
  rng = np.random.default_rng([seed, step])
  segment_len = seq_len // (2 * pairs_per_row)
  index = np.arange(seq_len)
  segment = np.where(index < 2 * pairs_per_row * segment_len, index // segment_len + 1, 0)
  positions = np.where(segment > 0, index % segment_len, 0)
  tokens = rng.integers(3, vocab_size, size=(batch_size, seq_len))
  completion = (positions >= segment_len // 2 - 1) & (positions < segment_len - 1) & (segment > 0)
  batch = {
      'inputs': tokens,
      'targets': np.concatenate([tokens[:, 1:], np.zeros((batch_size, 1), tokens.dtype)], 1),
      'segment_ids': np.broadcast_to(segment, (batch_size, seq_len)),
      'positions': np.broadcast_to(positions, (batch_size, seq_len)),
      'loss_weights': np.broadcast_to(completion, (batch_size, seq_len)),
      'pair_ids': np.broadcast_to((segment + 1) // 2, (batch_size, seq_len)),
      'chosen': np.broadcast_to(segment % 2 == 1, (batch_size, seq_len)),
      'ref_logps': np.where((positions == 0) & (segment > 0),
                            -rng.uniform(1, 10, size=(batch_size, seq_len)) * segment_len, 0),
  }
  return {k: batch[k].astype(dtype) for k, dtype in batch_keys(True, reference).items()}


class SyntheticIterator:
  """This host's rows of the synthetic global batches; its position is the step counter."""

  def __init__(self, seed, global_batch, seq_len, vocab_size, shard_index, shard_count):
    self._args = (seed, global_batch, seq_len, vocab_size)
    local = global_batch // shard_count
    self._rows = slice(shard_index * local, (shard_index + 1) * local)
    self._step = 0

  def __iter__(self):
    return self

  def __next__(self):
    seed, global_batch, seq_len, vocab = self._args
    batch = synthetic_global_batch(seed, self._step, global_batch, seq_len, vocab)
    self._step += 1
    return {k: v[self._rows] for k, v in batch.items()}

  def get_state(self) -> bytes:
    return str(self._step).encode()

  def set_state(self, state: bytes):
    self._step = int(state.decode())


class SyntheticData:
  """A DataSource (see train/loop.py) of synthetic batches; `eval_batches` uses a disjoint seed."""

  def __init__(self, seed: int, seq_len: int, vocab_size: int, eval_batches: int = 2):
    self.seed, self.seq_len, self.vocab_size, self.n_eval = seed, seq_len, vocab_size, eval_batches

  def train_iterator(self, shard_index, shard_count, batch_size):
    return SyntheticIterator(self.seed, batch_size * shard_count, self.seq_len, self.vocab_size,
                             shard_index, shard_count)

  def eval_batches(self, shard_index, shard_count, batch_size, max_batches):
    it = SyntheticIterator(self.seed + 1_000_003, batch_size * shard_count, self.seq_len,
                           self.vocab_size, shard_index, shard_count)
    n = min(self.n_eval, max_batches) if max_batches else self.n_eval
    return [next(it) for _ in range(n)]

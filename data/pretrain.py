"""The pretraining input pipeline: documents -> tokens (BOS ... EOS) -> packed rows -> batches."""

from typing import Any

import numpy as np
import tensorflow as tf

from data import packing, records, sources
from data.batch import pad_batch
from data.iterator import DatasetIterator
from data.tokenizer import load_tokenizer


class PretrainData:
  """Builds this host's train iterator and eval batches from `config.data`."""

  def __init__(self, data_config: Any, seq_len: int):
    self.config = data_config
    self.seq_len = seq_len
    self.tokenizer = load_tokenizer(data_config.tokenizer)
    self.counters = records.Counters()

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  def stats(self) -> dict[str, int]:
    """Records skipped or repaired so far by this host (since the process started)."""
    return self.counters.snapshot()

  def _texts_to_ids(self, texts: list[bytes]) -> list[list[int]]:
    ids = self.tokenizer.encode_batch([t.decode('utf-8') for t in texts])
    # Tokenizers without a BOS token (Qwen) start documents with nothing; `add_bos` says which.
    bos = [self.tokenizer.bos_id] if self.config.add_bos and self.tokenizer.add_bos else []
    eos = [self.tokenizer.eos_id] if self.config.add_eos else []
    return [bos + x + eos for x in ids]

  def dataset(self, split: str, shard_index: int, shard_count: int, batch_size: int) -> tf.data.Dataset:
    """Batches of packed rows. 'train' is shuffled and endless; 'eval' is one ordered, padded pass."""
    cfg, train = self.config, split == 'train'
    docs = sources.documents(
        cfg.format, cfg.train_files if train else cfg.eval_files, text_field=cfg.text_field,
        shard_index=shard_index, shard_count=shard_count, seed=cfg.seed if train else None,
        repeat=train, tfds_name=cfg.tfds_name,
        tfds_split=cfg.tfds_train_split if train else cfg.tfds_eval_split,
        tfds_data_dir=cfg.tfds_data_dir or None, utf8=cfg.invalid_utf8,
        max_record_bytes=cfg.max_record_bytes, skip_bad_records=cfg.skip_bad_records,
        counters=self.counters)
    if train and cfg.shuffle_buffer > 1:
      docs = docs.shuffle(cfg.shuffle_buffer, seed=cfg.seed, reshuffle_each_iteration=True)
    rows = packing.concat_and_split(packing.token_chunks(self._texts_to_ids, docs), self.seq_len,
                                    flush=not train)
    batches = rows.batch(batch_size, drop_remainder=train)
    pad_id = self.tokenizer.pad_id
    return batches.map(lambda r: packing.row_features(r, pad_id),
                       num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

  def has_eval(self) -> bool:
    return bool(self.config.eval_files if self.config.format != 'tfds' else self.config.tfds_eval_split)

  def train_iterator(self, shard_index: int, shard_count: int, batch_size: int) -> DatasetIterator:
    return DatasetIterator(self.dataset('train', shard_index, shard_count, batch_size))

  def eval_batches(self, shard_index: int, shard_count: int, batch_size: int,
                   max_batches: int) -> list[dict[str, np.ndarray]]:
    """This host's held-out batches, computed once and reused at every evaluation."""
    if not self.has_eval():
      return []
    ds = self.dataset('eval', shard_index, shard_count, batch_size)
    if max_batches:
      ds = ds.take(max_batches)
    return [pad_batch(b, batch_size) for b in DatasetIterator(ds)]

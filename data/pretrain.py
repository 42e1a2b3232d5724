"""The pretraining input pipeline: documents -> tokens (BOS ... EOS) -> packed rows -> batches, from
one source or a weighted mixture of them (data/mixture.py)."""

from typing import Any

import numpy as np
import tensorflow as tf

from data import mixture, packing, records, sources
from data.batch import pad_batch
from data.tokenizer import load_tokenizer


class PretrainData:
  """Builds this host's train iterator and eval batches from `config.data`."""

  def __init__(self, data_config: Any, seq_len: int):
    self.config = data_config
    self.seq_len = seq_len
    self.tokenizer = load_tokenizer(data_config.tokenizer)
    self.counters = records.Counters()
    self.sources = mixture.sources(data_config)
    self._train_iterator = None

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  def stats(self) -> dict[str, int]:
    """Records skipped or repaired so far by this host (since the process started); for a mixture,
    the real tokens each source has given the train iterator (since the run started)."""
    tokens = self._train_iterator.tokens_seen() if self._train_iterator else {}
    return {**self.counters.snapshot(), **tokens}

  def _texts_to_ids(self, texts: list[bytes]) -> list[list[int]]:
    ids = self.tokenizer.encode_batch([t.decode('utf-8') for t in texts])
    # Tokenizers without a BOS token (Qwen) start documents with nothing; `add_bos` says which.
    bos = [self.tokenizer.bos_id] if self.config.add_bos and self.tokenizer.add_bos else []
    eos = [self.tokenizer.eos_id] if self.config.add_eos else []
    return [bos + x + eos for x in ids]

  def _rows(self, source: mixture.Source, train: bool, shard_index: int, shard_count: int
            ) -> tf.data.Dataset:
    """One source's packed rows: for 'train' shuffled and endless, else one ordered, padded pass."""
    cfg = source.config
    docs = sources.documents(
        cfg.format, cfg.train_files if train else cfg.eval_files, text_field=cfg.text_field,
        shard_index=shard_index, shard_count=shard_count, seed=source.seed if train else None,
        repeat=train, tfds_name=cfg.tfds_name,
        tfds_split=cfg.tfds_train_split if train else cfg.tfds_eval_split,
        tfds_data_dir=cfg.tfds_data_dir or None, utf8=cfg.invalid_utf8,
        max_record_bytes=cfg.max_record_bytes, skip_bad_records=cfg.skip_bad_records,
        counters=self.counters)
    if train and cfg.shuffle_buffer > 1:
      docs = docs.shuffle(cfg.shuffle_buffer, seed=source.seed, reshuffle_each_iteration=True)
    return packing.concat_and_split(packing.token_chunks(self._texts_to_ids, docs), self.seq_len,
                                    flush=not train)

  def dataset(self, split: str, shard_index: int, shard_count: int, batch_size: int) -> tf.data.Dataset:
    """Batches of packed rows. 'train' is shuffled and endless; 'eval' is one ordered, padded pass."""
    train = split == 'train'
    rows = [(i, self._rows(s, train, shard_index, shard_count)) for i, s in enumerate(self.sources)
            if train or _has_eval(s.config)]
    return mixture.batches(rows, [s.weight for s in self.sources] if train else None, self.config.seed,
                           shard_index, batch_size, self.tokenizer.pad_id, bool(self.config.mixture))

  def has_eval(self) -> bool:
    return any(_has_eval(s.config) for s in self.sources)

  def train_iterator(self, shard_index: int, shard_count: int, batch_size: int) -> mixture.Iterator:
    self._train_iterator = mixture.Iterator(self.dataset('train', shard_index, shard_count, batch_size),
                                            [s.name for s in self.sources if s.name])
    return self._train_iterator

  def eval_batches(self, shard_index: int, shard_count: int, batch_size: int,
                   max_batches: int) -> list[dict[str, np.ndarray]]:
    """This host's held-out batches, computed once and reused at every evaluation."""
    if not self.has_eval():
      return []
    ds = self.dataset('eval', shard_index, shard_count, batch_size)
    if max_batches:
      ds = ds.take(max_batches)
    return [pad_batch(b, batch_size) for b in mixture.Iterator(ds)]


def _has_eval(cfg) -> bool:
  return bool(cfg.eval_files if cfg.format != 'tfds' else cfg.tfds_eval_split)

"""Measures the input pipelines on this host, in tokens/s: pretraining (read, tokenize, pack) and
instruction tuning (template + tokenize up front, then greedy example packing).

  python -m data.benchmark [--seq_len 4096 --batch_size 8 --seconds 10]
  python -m data.benchmark --train_files=my/*.jsonl --tokenizer=my.model   # your own data

Without files it builds the demo corpus (the Python documentation of this interpreter) and a
SentencePiece tokenizer in a temporary folder. Throughput counts every row slot delivered (B x T per
batch) and, separately, the slots holding real tokens (not padding): what the train step receives.
"""

import os
import tempfile
import time

from absl import app, flags

import numpy as np

_SEQ_LEN = flags.DEFINE_integer('seq_len', 4096, 'Row length.')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Rows per batch (per host).')
_SECONDS = flags.DEFINE_float('seconds', 10.0, 'Time each pipeline for about this long.')
_TRAIN_FILES = flags.DEFINE_string('train_files', '', 'Pretraining JSONL files (default: demo corpus).')
_SFT_FILES = flags.DEFINE_string('sft_files', '', 'Chat-format JSONL files (default: demo task).')
_TOKENIZER = flags.DEFINE_string('tokenizer', '', 'SentencePiece .model or tokenizer.json '
                                 '(default: one trained on the demo corpus).')
_VOCAB = flags.DEFINE_integer('vocab_size', 8000, 'Vocabulary of the tokenizer trained by default.')


def measure(iterator, seconds: float, warmup_batches: int = 2) -> dict[str, float]:
  """Pulls batches for about `seconds` (after warmup); tokens/s over row slots and real tokens."""
  for _ in range(warmup_batches):
    next(iterator)
  batches = slots = real = 0
  start = time.perf_counter()
  while time.perf_counter() - start < seconds:
    batch = next(iterator)
    batches += 1
    slots += batch['inputs'].size
    real += int(np.count_nonzero(batch['segment_ids']))
  elapsed = time.perf_counter() - start
  return {'batches': batches, 'seconds': elapsed, 'tokens_per_s': slots / elapsed,
          'real_tokens_per_s': real / elapsed, 'fill': real / max(slots, 1)}


def data_config(**overrides):
  from configs import default  # pylint: disable=import-outside-toplevel
  c = default.get_config().data
  c.update(overrides)
  return c


def demo_inputs(root: str, vocab_size: int) -> tuple[str, str, str]:
  """(pretraining files, chat files, tokenizer) built from the demo corpus under `root`."""
  from data import demo_corpus, sources, tokenizer  # pylint: disable=import-outside-toplevel
  corpus, sft = os.path.join(root, 'corpus'), os.path.join(root, 'sft')
  demo_corpus.write_corpus(corpus)
  demo_corpus.write_instruction_task(corpus, sft, n_train=20000, n_eval=10)
  model = os.path.join(root, 'tokenizer.model')
  train = os.path.join(corpus, 'train.jsonl')
  tokenizer.train_sentencepiece(sources.iter_texts_python([train], 'jsonl'), model, vocab_size)
  return train, os.path.join(sft, 'train.jsonl'), model


def benchmark_pretraining(files: str, tokenizer: str, seq_len: int, batch: int, seconds: float):
  from data.pretrain import PretrainData  # pylint: disable=import-outside-toplevel
  data = PretrainData(data_config(format='jsonl', train_files=files, tokenizer=tokenizer), seq_len)
  return measure(data.train_iterator(0, 1, batch), seconds)


def benchmark_sft(files: str, tokenizer: str, seq_len: int, batch: int, seconds: float):
  from data.sft import SFTData  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  data = SFTData(data_config(format='chat', train_files=files, tokenizer=tokenizer, packing=True,
                             eval_fraction=0.0), seq_len)
  load_s = time.perf_counter() - start
  n_tokens = sum(len(ids) for ids, _ in data.train_examples)
  result = measure(data.train_iterator(0, 1, batch), seconds)
  result.update(examples=len(data.train_examples), load_s=load_s, load_tokens_per_s=n_tokens / load_s)
  return result


def main(argv):
  del argv
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  seq_len, batch, seconds = _SEQ_LEN.value, _BATCH.value, _SECONDS.value
  with tempfile.TemporaryDirectory() as tmp:
    train, sft, tokenizer = _TRAIN_FILES.value, _SFT_FILES.value, _TOKENIZER.value
    if not (train and sft and tokenizer):
      start = time.perf_counter()
      demo_train, demo_sft, demo_tokenizer = demo_inputs(tmp, _VOCAB.value)
      train, sft, tokenizer = train or demo_train, sft or demo_sft, tokenizer or demo_tokenizer
      print(f'Built the demo corpus, chat task and tokenizer in {time.perf_counter() - start:.0f} s')
    print(f'{os.cpu_count()} CPU cores; rows of {seq_len} tokens, batches of {batch} rows')
    pre = benchmark_pretraining(train, tokenizer, seq_len, batch, seconds)
    print(f"pretraining (read JSONL, tokenize, pack): {pre['tokens_per_s']:,.0f} tokens/s "
          f"({pre['real_tokens_per_s']:,.0f} real, {100 * pre['fill']:.1f}% filled; "
          f"{pre['batches']} batches in {pre['seconds']:.1f} s)")
    sft_result = benchmark_sft(sft, tokenizer, seq_len, batch, seconds)
    print(f"SFT packing (greedy, whole examples): {sft_result['tokens_per_s']:,.0f} tokens/s "
          f"({sft_result['real_tokens_per_s']:,.0f} real, {100 * sft_result['fill']:.1f}% filled; "
          f"{sft_result['batches']} batches in {sft_result['seconds']:.1f} s); template + tokenize "
          f"{sft_result['examples']:,} examples up front: {sft_result['load_s']:.1f} s "
          f"({sft_result['load_tokens_per_s']:,.0f} tokens/s)")


if __name__ == '__main__':
  app.run(main)

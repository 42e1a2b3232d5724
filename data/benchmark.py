"""Measures the input pipelines on this host, in tokens/s: pretraining (read JSONL or Parquet,
tokenize, pack) and instruction tuning (template + tokenize up front, then greedy example packing).

  python -m data.benchmark [--seq_len 4096 --batch_size 8 --seconds 10]
  python -m data.benchmark --train_files=my/*.jsonl --parquet_files=my/*.parquet --tokenizer=my.model

Without files it builds the demo corpus (the Python documentation of this interpreter), the same
documents as Parquet (row groups of 1,000 rows) and a SentencePiece tokenizer in a temporary folder. Throughput counts every row slot delivered (B x T per
batch) and, separately, the slots holding real tokens (not padding): what the train step receives.
"""

import json
import os
import tempfile
import time

import numpy as np
from absl import flags

import runtime
from data import config

FLAGS = flags.FLAGS  # defined by _define_flags() when run as a program


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
  c = config.get_config()
  c.update(overrides)
  return c


def write_conversations(corpus_file: str, out_file: str, turns: int = 2, chars: int = 600) -> int:
  """Chat records of up to `turns` user/assistant exchanges (fewer for short documents), each message a
  `chars`-character slice of one corpus document: instruction-tuning examples of a realistic length
  (a few hundred tokens)."""
  n = 0
  with open(corpus_file, encoding='utf-8') as src, open(out_file, 'w', encoding='utf-8') as out:
    for line in src:
      text = json.loads(line)['text']
      parts = [text[i:i + chars] for i in range(0, min(len(text), 2 * turns * chars), chars)]
      if len(parts) < 2:
        continue
      roles = ['user', 'assistant'] * turns
      messages = [{'role': r, 'content': p} for r, p in zip(roles, parts[:len(parts) // 2 * 2])]
      out.write(json.dumps({'messages': messages}) + '\n')
      n += 1
  return n


def write_parquet(jsonl_file: str, out_file: str, rows_per_group: int = 1000) -> str:
  """The documents of a JSONL file as a Parquet file of one `text` column."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  with open(jsonl_file, encoding='utf-8') as f:
    texts = [json.loads(line)['text'] for line in f]
  pq.write_table(pa.table({'text': texts}), out_file, row_group_size=rows_per_group)
  return out_file


def demo_inputs(root: str, vocab_size: int) -> tuple[str, str, str, str]:
  """(pretraining files, short chat files, long chat files, tokenizer) from the demo corpus."""
  from data import demo_corpus, sources, tokenizer  # pylint: disable=import-outside-toplevel
  corpus, sft = os.path.join(root, 'corpus'), os.path.join(root, 'sft')
  demo_corpus.write_corpus(corpus)
  demo_corpus.write_instruction_task(corpus, sft, n_train=20000, n_eval=10)
  train = os.path.join(corpus, 'train.jsonl')
  conversations = os.path.join(root, 'conversations.jsonl')
  write_conversations(train, conversations)
  model = os.path.join(root, 'tokenizer.model')
  tokenizer.train_sentencepiece(sources.iter_texts_python([train], 'jsonl'), model, vocab_size)
  return train, os.path.join(sft, 'train.jsonl'), conversations, model


def benchmark_pretraining(files: str, tokenizer: str, seq_len: int, batch: int, seconds: float,
                          fmt: str = 'jsonl'):
  from data.pretrain import PretrainData  # pylint: disable=import-outside-toplevel
  data = PretrainData(data_config(format=fmt, train_files=files, tokenizer=tokenizer), seq_len)
  return measure(data.train_iterator(0, 1, batch), seconds)


def benchmark_sft(files: str, tokenizer: str, seq_len: int, batch: int, seconds: float):
  from data.sft import SFTData  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  data = SFTData(data_config(format='chat', train_files=files, tokenizer=tokenizer, packing=True,
                             eval_fraction=0.0), seq_len)
  load_s = time.perf_counter() - start
  n_tokens = sum(len(ids) for ids, _ in data.train_examples)
  result = measure(data.train_iterator(0, 1, batch), seconds)
  result.update(examples=len(data.train_examples), load_s=load_s, load_tokens=n_tokens,
                load_tokens_per_s=n_tokens / load_s)
  return result


def _sft_line(name: str, r: dict) -> str:
  per_example = r['load_tokens'] / max(r['examples'], 1)
  return (f"SFT packing, {name} ({r['examples']:,} examples, {per_example:,.0f} tokens each on "
          f"average): {r['tokens_per_s']:,.0f} tokens/s ({r['real_tokens_per_s']:,.0f} real, "
          f"{100 * r['fill']:.1f}% filled; {r['batches']} batches in {r['seconds']:.1f} s); template + "
          f"tokenize up front: {r['load_s']:.1f} s ({r['load_tokens_per_s']:,.0f} tokens/s)")


def main(argv):
  del argv
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  seq_len, batch, seconds = FLAGS.seq_len, FLAGS.batch_size, FLAGS.seconds
  with tempfile.TemporaryDirectory() as tmp:
    train, parquet, tokenizer = FLAGS.train_files, FLAGS.parquet_files, FLAGS.tokenizer
    sft = [('your files', FLAGS.sft_files)] if FLAGS.sft_files else []
    if not (train and parquet and sft and tokenizer):
      start = time.perf_counter()
      demo_train, demo_short, demo_long, demo_tokenizer = demo_inputs(tmp, FLAGS.vocab_size)
      train, tokenizer = train or demo_train, tokenizer or demo_tokenizer
      parquet = parquet or write_parquet(demo_train, os.path.join(tmp, 'train.parquet'))
      sft = sft or [('demo question task', demo_short), ('1-2 turn conversations', demo_long)]
      print(f'Built the demo corpus, chat data and tokenizer in {time.perf_counter() - start:.0f} s')
    print(f'{os.cpu_count()} CPU cores; rows of {seq_len} tokens, batches of {batch} rows')
    for fmt, name, files in (('jsonl', 'JSONL', train), ('parquet', 'Parquet', parquet)):
      pre = benchmark_pretraining(files, tokenizer, seq_len, batch, seconds, fmt)
      print(f"pretraining (read {name}, tokenize, pack): {pre['tokens_per_s']:,.0f} tokens/s "
            f"({pre['real_tokens_per_s']:,.0f} real, {100 * pre['fill']:.1f}% filled; "
            f"{pre['batches']} batches in {pre['seconds']:.1f} s)", flush=True)
    for name, files in sft:
      print(_sft_line(name, benchmark_sft(files, tokenizer, seq_len, batch, seconds)), flush=True)


def _define_flags():
  """Only when run as a program: importing this module (tests do) must not define flags that another
  entry point also defines."""
  flags.DEFINE_integer('seq_len', 4096, 'Row length.', lower_bound=2)
  flags.DEFINE_integer('batch_size', 8, 'Rows per batch (per host).', lower_bound=1)
  flags.DEFINE_float('seconds', 10.0, 'Time each pipeline for about this long.', lower_bound=0.1)
  flags.DEFINE_string('train_files', '', 'Pretraining JSONL files (default: demo corpus).')
  flags.DEFINE_string('parquet_files', '', 'Pretraining Parquet files, a `text` column (default: the '
                      'demo corpus as Parquet).')
  flags.DEFINE_string('sft_files', '', 'Chat-format JSONL files (default: the demo question '
                      'task, and 1-2 turn conversations cut from the demo corpus).')
  flags.DEFINE_string('tokenizer', '', 'SentencePiece .model or tokenizer.json '
                      '(default: one trained on the demo corpus).')
  flags.DEFINE_integer('vocab_size', 8000, 'Vocabulary of the tokenizer trained by default.',
                       lower_bound=1)


if __name__ == '__main__':
  _define_flags()
  runtime.run(main)

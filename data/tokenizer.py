"""Tokenizers behind one small interface, and `python -m data.tokenizer` to train a SentencePiece model.

This module imports no TensorFlow: model/generate.py and the SFT templates use it too.
"""

import os
import sys
import tempfile
from typing import Iterable, Sequence

from absl import app, flags, logging


class Tokenizer:
  """What the pipelines, chat templates and generation need from a tokenizer."""
  path: str
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]:
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    raise NotImplementedError

  def decode(self, ids: Sequence[int]) -> str:
    raise NotImplementedError

  def token_id(self, piece: str) -> int | None:
    """Id of a piece that is a single token in the vocabulary (e.g. '<|eot_id|>'), else None."""
    raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):

  def __init__(self, path: str):
    import sentencepiece as spm  # pylint: disable=import-outside-toplevel
    self.path = path
    with _open(path) as f:
      proto = f.read()
    self._sp = spm.SentencePieceProcessor(model_proto=proto)
    self.vocab_size = self._sp.get_piece_size()
    self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
    # Llama's tokenizer has no pad piece; any id works since padding carries zero loss weight.
    self.pad_id = max(self._sp.pad_id(), 0)
    if self.bos_id < 0 or self.eos_id < 0:
      raise ValueError(f'{path}: tokenizer has no BOS or EOS piece (bos={self.bos_id}, eos={self.eos_id})')

  def encode_batch(self, texts):
    return self._sp.encode(list(texts), num_threads=min(os.cpu_count() or 1, 8))

  def decode(self, ids):
    return self._sp.decode([int(i) for i in ids])

  def token_id(self, piece):
    i = self._sp.piece_to_id(piece)
    return None if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i) else i


def _open(path: str):
  if path.startswith('gs://'):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    return tf.io.gfile.GFile(path, 'rb')
  return open(path, 'rb')


def load_tokenizer(path: str) -> Tokenizer:
  """Loads a SentencePiece `.model` file (local or gs://)."""
  if not path:
    raise ValueError('No tokenizer given: set config.data.tokenizer to a SentencePiece .model file')
  if not path.startswith('gs://') and not os.path.exists(path):
    raise FileNotFoundError(f'Tokenizer file not found: {path}')
  return SentencePieceTokenizer(path)


def train_sentencepiece(texts: Iterable[str], model_path: str, vocab_size: int,
                        model_type: str = 'bpe', character_coverage: float = 1.0) -> Tokenizer:
  """Trains a Llama-style SentencePiece model (unk=0, bos=1, eos=2, byte fallback) on `texts`."""
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  if not model_path.endswith('.model'):
    raise ValueError(f'--out must end in .model, got {model_path}')
  os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    prefix = os.path.join(tmp, 'spm')
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=vocab_size,
        model_type=model_type, character_coverage=character_coverage, byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name='identity', remove_extra_whitespaces=False,
        max_sentence_length=1 << 16, train_extremely_large_corpus=False, minloglevel=2)
    # Write via a temporary name so that an interrupted run never leaves a truncated model behind.
    with open(prefix + '.model', 'rb') as f:
      proto = f.read()
  tmp_path = model_path + '.tmp'
  with open(tmp_path, 'wb') as f:
    f.write(proto)
  os.replace(tmp_path, model_path)
  return SentencePieceTokenizer(model_path)


FLAGS = flags.FLAGS


def main(argv):
  del argv
  from data import sources  # pylint: disable=import-outside-toplevel
  files = sources.resolve_files(FLAGS.input)
  texts = sources.iter_texts_python(files, FLAGS.format, FLAGS.text_field, max_chars=FLAGS.max_chars)
  tok = train_sentencepiece(texts, FLAGS.out, FLAGS.vocab_size, FLAGS.model_type)
  logging.info('Wrote %s (vocab %d)', FLAGS.out, tok.vocab_size)
  print(f'Wrote {FLAGS.out}: {tok.vocab_size} pieces, bos={tok.bos_id} eos={tok.eos_id}')


if __name__ == '__main__':
  flags.DEFINE_string('input', None, 'Comma-separated files or globs (local or gs://).', required=True)
  flags.DEFINE_enum('format', 'lines', ['lines', 'files', 'jsonl'],
                    'lines: a document per line; files: a document per file; jsonl: a `text_field` per line.')
  flags.DEFINE_string('text_field', 'text', 'JSONL field holding the text.')
  flags.DEFINE_string('out', None, 'Output .model path.', required=True)
  flags.DEFINE_integer('vocab_size', 8000, 'Vocabulary size.')
  flags.DEFINE_enum('model_type', 'bpe', ['bpe', 'unigram'], 'SentencePiece algorithm.')
  flags.DEFINE_integer('max_chars', 200_000_000, 'Stop reading the corpus after this many characters.')
  sys.exit(app.run(main))

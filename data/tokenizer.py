"""Tokenizers behind one small interface, and `python -m data.tokenizer` to train a SentencePiece model.

Two kinds: SentencePiece `.model` files (Llama 2, Mistral) and Hugging Face `tokenizer.json` files
(Llama 3, Qwen) through the `tokenizers` package; `load_tokenizer` picks by file type. This module
imports no TensorFlow (gs:// paths go through etils.epath): model/generate.py and the chat templates use it.
"""

import os
import sys
import tempfile
from typing import Iterable, Sequence

from absl import app, flags, logging
from etils import epath

from data import records


class Tokenizer:
  """What the pipelines, chat templates and generation need from a tokenizer."""
  path: str
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int
  # Whether the model expects BOS before a plain-text prompt (Qwen's tokenizers add none).
  add_bos: bool = True

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
    if not proto:
      raise ValueError(f'{path} is empty (0 bytes), not a SentencePiece model: was it copied completely?')
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=proto)
    except RuntimeError:
      raise ValueError(f'{path} is not a SentencePiece model ({len(proto):,} bytes that do not parse as '
                       'one); give the tokenizer.model the model was trained with, or a Hugging Face '
                       'tokenizer.json') from None
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


class HuggingFaceTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json` (Llama 3, Qwen, Mistral's fast tokenizer) via the `tokenizers` package.

  BOS/EOS/PAD come from `tokenizer_config.json` or `special_tokens_map.json` beside the file when they
  name them, else from well-known token names (`WELL_KNOWN`). Text is encoded without special tokens:
  templates and pipelines add BOS/EOS themselves.
  """
  WELL_KNOWN = {
      'bos': ('<|begin_of_text|>', '<s>', '<bos>', '<|startoftext|>'),
      'eos': ('<|end_of_text|>', '</s>', '<|endoftext|>', '<eos>'),
      'pad': ('<|finetune_right_pad_id|>', '<pad>', '<|pad|>'),
  }

  def __init__(self, path: str):
    import tokenizers  # pylint: disable=import-outside-toplevel
    self.path = path
    with _open(path) as f:
      text = f.read().decode('utf-8', errors='replace')
    try:
      self._tok = tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # pylint: disable=broad-exception-caught  (the Rust parser's error)
      raise ValueError(f'{path} is not a Hugging Face tokenizer.json ({str(e)[:200] or "empty"})') from None
    # Text never becomes a control token: a document or user message that contains "<|im_end|>" is
    # tokenized as those characters. Templates insert special tokens explicitly (data/chat.py).
    self._tok.encode_special_tokens = True
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self.vocab_size = max(vocab.values()) + 1
    declared = _declared_special_tokens(os.path.dirname(path))
    ids = {}
    for kind in ('bos', 'eos', 'pad'):
      if kind in declared:  # named by tokenizer_config.json (None: it says there is none)
        name = declared[kind]
        if name is not None and self.token_id(name) is None:
          raise ValueError(f'{path}: tokenizer_config.json names {kind}_token {name!r}, which is not a '
                           'single token of this tokenizer')
      else:
        name = next((t for t in self.WELL_KNOWN[kind] if self.token_id(t) is not None), None)
      ids[kind] = None if name is None else self.token_id(name)
    if ids['eos'] is None:
      raise ValueError(f'{path}: cannot tell the EOS token: no tokenizer_config.json eos_token beside it, '
                       f'and none of {self.WELL_KNOWN["eos"]} is in the vocabulary')
    if ids['bos'] is None:
      # Qwen and GPT-2 style tokenizers have no BOS (tokenizer_config.json: "bos_token": null) and start
      # documents with the end-of-text token, as their config.json bos_token_id does.
      if 'bos' not in declared:
        raise ValueError(f'{path}: cannot tell the BOS token: no tokenizer_config.json bos_token beside it, '
                         f'and none of {self.WELL_KNOWN["bos"]} is in the vocabulary')
      ids['bos'] = ids['eos']
    self.bos_id, self.eos_id = ids['bos'], ids['eos']
    # The tokenizer's own post-processor says whether it starts a text with BOS (Llama 3: yes).
    self.add_bos = ids['bos'] != ids['eos'] and self._tok.encode('a').ids[:1] == [self.bos_id]
    # Any id works for padding (it carries zero loss weight and is masked out of attention).
    self.pad_id = ids['pad'] if ids['pad'] is not None else self.eos_id

  def encode_batch(self, texts):
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids):
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def token_id(self, piece):
    return self._tok.token_to_id(piece)


def _declared_special_tokens(folder: str) -> dict[str, str | None]:
  """{'bos': ..., 'eos': ..., 'pad': ...} as named by tokenizer_config.json / special_tokens_map.json."""
  import json  # pylint: disable=import-outside-toplevel
  found = {}
  for name in ('special_tokens_map.json', 'tokenizer_config.json'):  # the second wins
    path = os.path.join(folder, name)
    if folder.startswith('gs://') or not os.path.exists(path):
      continue
    with open(path, encoding='utf-8') as f:
      config = json.load(f)
    for kind in ('bos', 'eos', 'pad'):
      if f'{kind}_token' in config:
        value = config[f'{kind}_token']
        found[kind] = value.get('content') if isinstance(value, dict) else value
  return found


def _open(path: str):
  return epath.Path(path).open('rb')


def load_tokenizer(path: str) -> Tokenizer:
  """Loads a tokenizer by file type: a SentencePiece `.model` file, or a Hugging Face `tokenizer.json`
  (or a folder holding one of them; tokenizer.json wins). Local or gs:// (files only)."""
  if not path:
    raise ValueError('No tokenizer given: set config.data.tokenizer to a SentencePiece .model file, a '
                     'Hugging Face tokenizer.json, or a folder holding one')
  if not path.startswith('gs://'):
    if not os.path.exists(path):
      raise FileNotFoundError(f'Tokenizer file not found: {path}')
    if os.path.isdir(path):
      for name in ('tokenizer.json', 'tokenizer.model'):
        if os.path.isfile(os.path.join(path, name)):
          return load_tokenizer(os.path.join(path, name))
      raise FileNotFoundError(f'{path} holds neither tokenizer.json nor tokenizer.model')
  if path.endswith('.json'):
    return HuggingFaceTokenizer(path)
  if path.endswith('.model'):
    return SentencePieceTokenizer(path)
  raise ValueError(f'{path}: expected a SentencePiece .model file or a Hugging Face tokenizer.json')


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int):
  """A tokenizer may have fewer ids than the model's embedding table (tables are often padded), never
  more: those tokens would have no embedding."""
  if tokenizer.vocab_size > model_vocab_size:
    raise ValueError(f'tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model\'s '
                     f'vocabulary is only {model_vocab_size}: ids >= {model_vocab_size} would have no '
                     'embedding. Use the tokenizer the model was trained with.')


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


def _reading_progress(texts: Iterable[str], files: Sequence[str], max_chars: int) -> Iterable[str]:
  """`texts`, with a progress bar (rate, ETA) on a terminal. The total is the files' size in bytes,
  capped at `max_chars`; each document counts its characters, so the bar is approximate for JSONL."""
  import tqdm  # pylint: disable=import-outside-toplevel
  total = sum(epath.Path(f).stat().length for f in files)
  total = min(total, max_chars) if max_chars else total
  with tqdm.tqdm(total=total, desc='Reading the corpus', unit='char', unit_scale=True,
                 disable=None) as bar:
    docs = 0
    for text in texts:
      docs += 1
      bar.update(len(text) + 1)
      yield text
    bar.update(max(bar.total - bar.n, 0))  # all read: the rest was JSON syntax, line ends, or empty
  logging.info('Read %d documents; training the SentencePiece model (no progress shown) ...', docs)


def main(argv):
  del argv
  from data import sources  # pylint: disable=import-outside-toplevel
  files = sources.resolve_files(FLAGS.input)
  texts = sources.iter_texts_python(files, FLAGS.format, FLAGS.text_field, max_chars=FLAGS.max_chars)
  texts = _reading_progress(texts, files, FLAGS.max_chars)
  tok = train_sentencepiece(texts, FLAGS.out, FLAGS.vocab_size, FLAGS.model_type)
  logging.info('Wrote %s (vocab %d)', FLAGS.out, tok.vocab_size)
  print(f'Wrote {FLAGS.out}: {tok.vocab_size} pieces, bos={tok.bos_id} eos={tok.eos_id}')


if __name__ == '__main__':
  flags.DEFINE_string('input', None, 'Comma-separated files or globs (local or gs://).', required=True)
  flags.DEFINE_enum('format', 'lines', ['lines', 'files', 'jsonl'],
                    'lines: a document per line; files: a document per file; jsonl: a `text_field` per line.')
  flags.DEFINE_string('text_field', 'text', 'JSONL field holding the text.')
  flags.DEFINE_string('out', None, 'Output .model path.', required=True)
  flags.DEFINE_integer('vocab_size', 8000, 'Vocabulary size.', lower_bound=1)
  flags.DEFINE_enum('model_type', 'bpe', ['bpe', 'unigram'], 'SentencePiece algorithm.')
  flags.DEFINE_integer('max_chars', 200_000_000, 'Stop reading the corpus after this many characters.',
                       lower_bound=1)
  sys.exit(app.run(records.reporting_bad_input(main)))

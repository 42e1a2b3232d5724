"""Tokenizers behind one small interface, and `python -m data.tokenizer` to train one of either kind.

Two kinds: SentencePiece `.model` files (Llama 2, Mistral) and Hugging Face `tokenizer.json` files
(Llama 3, Qwen) through the `tokenizers` package; `load_tokenizer` picks by file type. This module
imports no TensorFlow (gs:// paths go through etils.epath): model/generate.py and the chat templates use it.

  python -m data.tokenizer --input='data/*.jsonl' --format=jsonl --vocab_size=32000 --out=tokenizer.model
  python -m data.tokenizer --kind=bpe --input='data/*.parquet' --format=parquet --vocab_size=32000 \
    --special_tokens=llama3,chatml --out=tokenizer/tokenizer.json
"""

import os
import sys
import tempfile
from typing import Iterable, Sequence

from absl import app, flags, logging
from etils import epath


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

  def control_tokens(self) -> dict[int, str]:
    """{id: text} of the tokens that `decode` leaves out (BOS, EOS, chat template markers)."""
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

  def control_tokens(self):
    return {i: self._sp.id_to_piece(i) for i in range(self.vocab_size) if self._sp.is_control(i)}


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
      self._tok = tokenizers.Tokenizer.from_str(f.read().decode('utf-8'))
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

  def control_tokens(self):
    return {i: t.content for i, t in self._tok.get_added_tokens_decoder().items() if t.special}


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
                        model_type: str = 'bpe', character_coverage: float = 1.0,
                        special_tokens: Sequence[str] = ()) -> Tokenizer:
  """Trains a Llama-style SentencePiece model (unk=0, bos=1, eos=2, byte fallback) on `texts`;
  `special_tokens` (e.g. chat template markers) become single pieces."""
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
        max_sentence_length=1 << 16, train_extremely_large_corpus=False, minloglevel=2,
        user_defined_symbols=list(special_tokens))
    with open(prefix + '.model', 'rb') as f:
      _write_atomically(model_path, f.read())
  return SentencePieceTokenizer(model_path)


def _write_atomically(path: str, data: bytes):
  """Via a temporary name, so that an interrupted run never leaves a truncated file behind."""
  tmp_path = path + '.tmp'
  with open(tmp_path, 'wb') as f:
    f.write(data)
  os.replace(tmp_path, path)


# Llama 3's pre-tokenizer split (GPT-4's pattern): contractions, runs of letters, numbers of up to three
# digits, punctuation, line breaks and other whitespace.
BPE_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                     r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# What `--special_tokens=NAME` adds: the markers of that chat template (data/chat.py).
CHAT_SPECIAL_TOKENS = {
    'llama3': ('<|begin_of_text|>', '<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>'),
    'chatml': ('<|im_start|>', '<|im_end|>'),
}


def special_token_list(names: Iterable[str]) -> list[str]:
  """Template names of CHAT_SPECIAL_TOKENS expanded, other entries kept as tokens; no repeats."""
  tokens = [t for name in names for t in CHAT_SPECIAL_TOKENS.get(name, (name,))]
  return list(dict.fromkeys(tokens))


def train_bpe(texts: Iterable[str], path: str, vocab_size: int, special_tokens: Sequence[str] = (),
              bos_token: str = '<|begin_of_text|>', eos_token: str = '<|end_of_text|>',
              min_frequency: int = 2) -> Tokenizer:
  """Trains a byte-level BPE `tokenizer.json` as Llama 3 and Qwen have: text split by Llama 3's
  pattern, bytes mapped to printable characters (any text encodes; no unknown token), merges learned
  on `texts`. BOS (`bos_token`; '' for none, as Qwen), EOS and `special_tokens` take the last ids of
  the `vocab_size`, as in Llama 3. The post-processor starts a text with BOS, as Llama 3's does. A
  tokenizer_config.json beside it names BOS and EOS, for load_tokenizer and transformers alike."""
  import json  # pylint: disable=import-outside-toplevel
  from tokenizers import (  # pylint: disable=import-outside-toplevel
      AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers)
  import tokenizers  # pylint: disable=import-outside-toplevel
  if not path.endswith('.json'):
    raise ValueError(f'--out must end in .json (e.g. tokenizer.json), got {path}')
  specials = list(dict.fromkeys([t for t in (bos_token, eos_token) if t] + list(special_tokens)))
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if vocab_size < len(alphabet) + len(specials):
    raise ValueError(f'--vocab_size {vocab_size} is less than the {len(alphabet)} byte tokens and '
                     f'{len(specials)} special tokens')
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(BPE_SPLIT_PATTERN), behavior='isolated'),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), min_frequency=min_frequency,
                                initial_alphabet=alphabet, show_progress=False)
  tok.train_from_iterator(texts, trainer)
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
  if bos_token:
    tok.post_processor = processors.TemplateProcessing(
        single=f'{bos_token} $A', pair=f'{bos_token} $A {bos_token} $B',
        special_tokens=[(bos_token, tok.token_to_id(bos_token))])
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': bos_token or None,
            'eos_token': eos_token, 'clean_up_tokenization_spaces': False}
  _write_atomically(os.path.join(folder, 'tokenizer_config.json'), json.dumps(config, indent=2).encode())
  _write_atomically(path, tok.to_str().encode('utf-8'))
  return HuggingFaceTokenizer(path)


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
  logging.info('Read %d documents; training the tokenizer (no progress shown) ...', docs)


def main(argv):
  del argv
  from data import sources  # pylint: disable=import-outside-toplevel
  files = sources.resolve_files(FLAGS.input)
  texts = sources.iter_texts_python(files, FLAGS.format, FLAGS.text_field, max_chars=FLAGS.max_chars)
  texts = _reading_progress(texts, files, FLAGS.max_chars)
  specials = special_token_list(FLAGS.special_tokens)
  if FLAGS.kind == 'bpe':
    tok = train_bpe(texts, FLAGS.out, FLAGS.vocab_size, specials, FLAGS.bos_token, FLAGS.eos_token)
  else:
    tok = train_sentencepiece(texts, FLAGS.out, FLAGS.vocab_size, FLAGS.model_type,
                              special_tokens=specials)
  logging.info('Wrote %s (vocab %d)', FLAGS.out, tok.vocab_size)
  named = ''.join(f' {t}={tok.token_id(t)}' for t in specials)
  print(f'Wrote {FLAGS.out}: {tok.vocab_size} tokens, bos={tok.bos_id} eos={tok.eos_id}{named}')


def define_flags():
  flags.DEFINE_string('input', None, 'Comma-separated files or globs (local or gs://).', required=True)
  flags.DEFINE_enum('format', 'lines', ['lines', 'files', 'jsonl', 'parquet'],
                    'lines: a document per line; files: a document per file; jsonl: a `text_field` '
                    'per line; parquet: the `text_field` column.')
  flags.DEFINE_string('text_field', 'text', 'JSONL field or Parquet column holding the text.')
  flags.DEFINE_enum('kind', 'sentencepiece', ['sentencepiece', 'bpe'],
                    'sentencepiece: a Llama 2 style .model; bpe: a byte-level BPE tokenizer.json, as '
                    'Llama 3 and Qwen have.')
  flags.DEFINE_string('out', None, 'Output path: a .model (sentencepiece) or a .json (bpe; a '
                      'tokenizer_config.json is written beside it).', required=True)
  flags.DEFINE_integer('vocab_size', 8000, 'Vocabulary size, special tokens included.')
  flags.DEFINE_list('special_tokens', [], 'Tokens to add as single ids: chat template names ('
                    f'{", ".join(CHAT_SPECIAL_TOKENS)}: their markers) or the tokens themselves.')
  flags.DEFINE_string('bos_token', '<|begin_of_text|>', 'bpe: the BOS token; empty for none (Qwen).')
  flags.DEFINE_string('eos_token', '<|end_of_text|>', 'bpe: the EOS token.')
  flags.DEFINE_enum('model_type', 'bpe', ['bpe', 'unigram'], 'sentencepiece: its algorithm.')
  flags.DEFINE_integer('max_chars', 200_000_000, 'Stop reading the corpus after this many characters.')


if __name__ == '__main__':
  define_flags()
  sys.exit(app.run(main))

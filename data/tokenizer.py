"""Tokenizers behind one small interface, and `python -m data.tokenizer` to train one of either kind.

Two kinds: SentencePiece `.model` files (Llama 2, Mistral) and Hugging Face `tokenizer.json` files
(Llama 3, Qwen) through the `tokenizers` package; `load_tokenizer` picks by file type. This module
imports no TensorFlow (gs:// paths go through etils.epath): model/generate.py and the chat templates use it.

  python -m data.tokenizer --input='data/*.jsonl' --format=jsonl --vocab_size=32000 --out=tokenizer.model
  python -m data.tokenizer --kind=bpe --input='data/*.parquet' --format=parquet --vocab_size=32000 \
    --special_tokens=llama3,chatml --out=tokenizer/tokenizer.json

Plain text (`encode`: pretraining documents, prompts without a template) is tokenized as the file
itself does, and never yields a special token. A chat rendered by a template (`encode_chat`) is
tokenized as transformers' `apply_chat_template(tokenize=True)` tokenizes it, so that a model is tuned
on the ids its serving stack will feed it: the special tokens written in the text are single tokens,
nothing is added, and a SentencePiece model (or a tokenizer.json whose tokenizer_config.json says
LlamaTokenizer) prefixes "▁" as transformers' LlamaTokenizer does, by its `legacy` setting.
"""

import json
import os
import re
import tempfile
from typing import Iterable, Sequence

import numpy as np
from absl import flags, logging
from etils import epath

from data import records
import runtime


class Tokenizer:
  """What the pipelines, chat templates and generation need from a tokenizer."""
  path: str
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int
  # Whether the model expects BOS before a plain-text prompt (Qwen's tokenizers add none).
  add_bos: bool = True
  # The named special tokens, as chat templates see them (transformers' special_tokens_map):
  # {'bos_token': '<s>', 'eos_token': '</s>', ...}; a tokenizer without a BOS (Qwen) has no 'bos_token'.
  special_tokens_map: dict[str, str]

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

  def special_tokens(self) -> dict[str, int]:
    """The special tokens (text -> id) that `encode_chat` recognises in a rendered chat."""
    return {text: i for i, text in self.control_tokens().items()}

  def encode_chat(self, text: str, plain: Sequence[tuple[int, int]] = ()
                  ) -> tuple[list[int], list[tuple[int, int]]]:
    """A rendered chat -> (ids, each token's (start, end) characters in `text`), as transformers
    tokenizes it (see the module docstring). Inside the `plain` character ranges (special-token text
    that a message contained), the text stays text, as with transformers' sanitize_control_tokens."""
    raise NotImplementedError


def _chat_pieces(text: str, plain: Sequence[tuple[int, int]]) -> Iterable[tuple[int, int, bool]]:
  """(start, end, is plain) pieces of `text`, split at the `plain` ranges (sorted, disjoint)."""
  at = 0
  for start, end in plain:
    if start > at:
      yield at, start, False
    yield start, end, True
    at = end
  if at < len(text):
    yield at, len(text), False


def _prepend_scheme(config: dict) -> str:
  """Where transformers' LlamaTokenizer (v5) prefixes "▁" (tokenization_utils_base._get_prepend_scheme):
  before the text at the start of the string (legacy=False, its default), after every special token too
  (legacy=True), or nowhere (add_prefix_space=False)."""
  if config.get('add_prefix_space') is False:
    return 'never'
  return 'always' if config.get('legacy', False) else 'first'


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
    self.special_tokens_map = {f'{kind}_token': self._sp.id_to_piece(i) for kind, i in (
        ('bos', self.bos_id), ('eos', self.eos_id), ('unk', self._sp.unk_id()), ('pad', self._sp.pad_id()))
                               if i >= 0}
    self._proto = proto
    self._chat = None  # what encode_chat needs, made on first use

  def encode_batch(self, texts):
    return self._sp.encode(list(texts), num_threads=min(os.cpu_count() or 1, 8))

  def decode(self, ids):
    return self._sp.decode([int(i) for i in ids])

  def token_id(self, piece):
    i = self._sp.piece_to_id(piece)
    return None if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i) else i

  def control_tokens(self):
    return {i: self._sp.id_to_piece(i) for i in range(self.vocab_size) if self._sp.is_control(i)}

  def _chat_state(self):
    """transformers converts a SentencePiece model into a BPE with Metaspace("▁", split=False) and makes
    every unknown, control and user-defined piece a special token matched in the text. The same ids
    come from sentencepiece itself without its dummy prefix, on the text between special tokens, with
    "▁" prefixed where transformers prefixes it (checked in tests/test_chat.py)."""
    if self._chat is None:
      import sentencepiece as spm  # pylint: disable=import-outside-toplevel
      from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel
      model = sentencepiece_model_pb2.ModelProto()
      model.ParseFromString(self._proto)
      kinds = {model.SentencePiece.UNKNOWN, model.SentencePiece.CONTROL, model.SentencePiece.USER_DEFINED}
      specials = {p.piece: i for i, p in enumerate(model.pieces) if p.type in kinds}
      user_defined = {p.piece for p in model.pieces if p.type == model.SentencePiece.USER_DEFINED}
      # The bytes of text each piece stands for (-1: not known, as for <unk>), for token offsets.
      piece_bytes = np.array([1 if p.type == model.SentencePiece.BYTE else
                              len(p.piece.replace('▁', ' ').encode()) if p.type == model.SentencePiece.NORMAL
                              else -1 for p in model.pieces], np.int64)
      if model.trainer_spec.model_type != model.trainer_spec.BPE:
        logging.warning('%s is a %s model: transformers reads SentencePiece models as BPE, so its ids for '
                        'a rendered chat may differ from ours', self.path,
                        model.trainer_spec.ModelType.Name(model.trainer_spec.model_type))
      model.normalizer_spec.add_dummy_prefix = False
      sp = spm.SentencePieceProcessor(model_proto=model.SerializeToString())
      pattern = re.compile('|'.join(map(re.escape, sorted(specials, key=len, reverse=True))))
      scheme = _prepend_scheme(_read_json(os.path.dirname(self.path), 'tokenizer_config.json'))
      self._chat = sp, specials, user_defined, pattern, scheme, piece_bytes
    return self._chat

  def special_tokens(self):
    return dict(self._chat_state()[1])  # control, unknown and user-defined pieces, as in transformers

  def encode_chat(self, text, plain=()):
    sp, specials, user_defined, pattern, scheme, piece_bytes = self._chat_state()
    ids, offsets = [], []

    def add_text(start, end, after_special):
      segment = text[start:end]
      prefix = ((scheme == 'first' and start == 0) or (scheme == 'always' and (start == 0 or after_special))
                ) and not segment.startswith(' ')
      encoded = (' ' if prefix else '') + segment
      piece_ids = sp.encode(encoded)
      lengths = piece_bytes[piece_ids]
      ends = np.cumsum(lengths)
      if lengths.min(initial=0) < 0 or (ends[-1] if len(ends) else 0) != len(encoded.encode('utf-8')):
        pieces = sp.encode(encoded, return_type='proto').pieces  # offsets as sentencepiece has them
        piece_ids = [p.id for p in pieces]
        begins, ends = np.array([p.begin for p in pieces], np.int64), np.array([p.end for p in pieces], np.int64)
      else:
        begins = ends - lengths
      char_at = _char_offsets(encoded)
      ids.extend(piece_ids)
      offsets.extend(zip((start + np.maximum(char_at[begins] - prefix, 0)).tolist(),
                         (start + np.maximum(char_at[ends] - prefix, 0)).tolist()))

    for start, end, is_plain in _chat_pieces(text, plain):
      if is_plain:
        # sentencepiece never matches control pieces in text, but does match user-defined ones: those
        # go in one character at a time.
        for a, b in ([(i, i + 1) for i in range(start, end)] if text[start:end] in user_defined
                     else [(start, end)]):
          add_text(a, b, False)
        continue
      at, after_special = start, False
      for match in pattern.finditer(text, start, end) if specials else ():
        if match.start() > at:
          add_text(at, match.start(), after_special)
        ids.append(specials[match.group()])
        offsets.append(match.span())
        at, after_special = match.end(), True
      if at < end:
        add_text(at, end, after_special)
    return ids, offsets


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
    self._config = _read_json(os.path.dirname(path), 'tokenizer_config.json')
    self._chat = None  # what encode_chat needs, made on first use
    # transformers also counts as special the tokens that tokenizer_config.json lists (its own
    # save_pretrained lists a SentencePiece model's user-defined pieces there).
    listed = [self._config.get(key) or () for key in ('extra_special_tokens', 'additional_special_tokens')]
    listed = {t.get('content') if isinstance(t, dict) else t
              for tokens in listed for t in (tokens.values() if isinstance(tokens, dict) else tokens)}
    added = {t.content: t for t in self._tok.get_added_tokens_decoder().values()}
    self._tok.add_special_tokens([
        tokenizers.AddedToken(t, single_word=added[t].single_word, lstrip=added[t].lstrip,
                              rstrip=added[t].rstrip, normalized=added[t].normalized, special=True)
        for t in sorted(listed & set(added)) if not added[t].special])
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
    found = {f'{kind}_token': self._tok.id_to_token(ids[kind]) for kind in ('bos', 'eos')
             if kind not in declared and not (kind == 'bos' and ids['bos'] == ids['eos'])}
    self.special_tokens_map = {**{f'{k}_token': v for k, v in declared.items()
                                  if v is not None and self.token_id(v) is not None}, **found}

  def encode_batch(self, texts):
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids):
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def token_id(self, piece):
    return self._tok.token_to_id(piece)

  def control_tokens(self):
    return {i: t.content for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

  def _chat_tokenizers(self):
    """(recognising special tokens, keeping them as text). transformers 5 rebuilds a LlamaTokenizer's
    normalizer and pre-tokenizer whatever tokenizer.json says (Metaspace, no normalizer); so do we."""
    if self._chat is None:
      import tokenizers  # pylint: disable=import-outside-toplevel
      chat = tokenizers.Tokenizer.from_str(self._tok.to_str())
      if self._config.get('tokenizer_class') in ('LlamaTokenizer', 'LlamaTokenizerFast'):
        chat.normalizer = None
        chat.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(
            replacement='▁', prepend_scheme=_prepend_scheme(self._config), split=False)
      as_text = tokenizers.Tokenizer.from_str(chat.to_str())
      chat.encode_special_tokens, as_text.encode_special_tokens = False, True
      self._chat = chat, as_text, chat.encode('\n', add_special_tokens=False).ids
    return self._chat

  def encode_chat(self, text, plain=()):
    chat, as_text, newline = self._chat_tokenizers()
    if not plain:
      encoding = chat.encode(text, add_special_tokens=False)
      return encoding.ids, encoding.offsets
    # As transformers' sanitize_control_tokens does (chat_template_utils.encode_marked_chat): each piece
    # on its own, a piece after the first behind a newline (so that no "▁" is prefixed), then dropped.
    ids, offsets = [], []
    for start, end, is_plain in _chat_pieces(text, plain):
      tokenizer, piece = (as_text if is_plain else chat), text[start:end]
      encoding = tokenizer.encode('\n' + piece, add_special_tokens=False) if start else None
      if encoding is not None and encoding.ids[:len(newline)] == newline:
        skip, shift = len(newline), 1
      else:
        encoding, skip, shift = tokenizer.encode(piece, add_special_tokens=False), 0, 0
      ids += encoding.ids[skip:]
      offsets += [(start + max(a - shift, 0), start + max(b - shift, 0)) for a, b in encoding.offsets[skip:]]
    return ids, offsets


def _read_json(folder: str, name: str) -> dict:
  """A JSON file beside the tokenizer (tokenizer_config.json, ...), or {} where there is none; read as
  a file one did not make (data/records.py `read_json_file`: a regular file, bounded, parse errors
  naming it)."""
  path = epath.Path(folder) / name
  if not path.exists():
    return {}
  value = records.read_json_file(str(path), records.MAX_JSON_FILE_BYTES)
  if not isinstance(value, dict):
    raise ValueError(f'{path}: expected a JSON object, got {type(value).__name__}')
  return value


def _declared_special_tokens(folder: str) -> dict[str, str | None]:
  """{'bos': ..., 'eos': ..., 'pad': ..., 'unk': ...} as named by tokenizer_config.json /
  special_tokens_map.json (None: it says there is none)."""
  found = {}
  for name in ('special_tokens_map.json', 'tokenizer_config.json'):  # the second wins
    config = _read_json(folder, name)
    for kind in ('bos', 'eos', 'pad', 'unk', 'sep', 'cls', 'mask'):
      if f'{kind}_token' in config:
        value = config[f'{kind}_token']
        found[kind] = value.get('content') if isinstance(value, dict) else value
  return found


def _char_offsets(text: str) -> np.ndarray:
  """For each UTF-8 byte offset into `text` (and its end), the character it falls in."""
  if text.isascii():
    return np.arange(len(text) + 1)
  code_points = np.frombuffer(text.encode('utf-32-le'), np.uint32)
  utf8_bytes = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
  return np.append(np.repeat(np.arange(len(text)), utf8_bytes), len(text))


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
    'mistral-v3': ('[INST]', '[/INST]'),
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
  flags.DEFINE_integer('vocab_size', 8000, 'Vocabulary size, special tokens included.', lower_bound=1)
  flags.DEFINE_list('special_tokens', [], 'Tokens to add as single ids: chat template names ('
                    f'{", ".join(CHAT_SPECIAL_TOKENS)}: their markers) or the tokens themselves.')
  flags.DEFINE_string('bos_token', '<|begin_of_text|>', 'bpe: the BOS token; empty for none (Qwen).')
  flags.DEFINE_string('eos_token', '<|end_of_text|>', 'bpe: the EOS token.')
  flags.DEFINE_enum('model_type', 'bpe', ['bpe', 'unigram'], 'sentencepiece: its algorithm.')
  flags.DEFINE_integer('max_chars', 200_000_000, 'Stop reading the corpus after this many characters.',
                       lower_bound=1)


if __name__ == '__main__':
  define_flags()
  runtime.run(main)

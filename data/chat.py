"""Chat templates: conversations -> token ids with an exact loss mask, and prompts for generation.

A template renders a conversation as a list of pieces (text, or a special token), each marked trained
or not, and tokenizes piece by piece: the mask is exact by construction, with no re-alignment of
characters to tokens. Trained: every assistant turn and the token that ends it. Not trained: system
and user text, headers, BOS. Pieces break at whitespace or special tokens, where tokenizing in pieces
gives the same ids as tokenizing the whole string. No TensorFlow here: generation uses it too.
"""

import dataclasses
from typing import Sequence

from data.tokenizer import Tokenizer

ROLES = ('system', 'user', 'assistant')
BOS, EOS = '<bos>', '<eos>'  # stand for the tokenizer's own BOS/EOS ids


@dataclasses.dataclass(frozen=True)
class Piece:
  text: str = ''
  token: str = ''   # a special token (by its text, or BOS/EOS above) instead of text
  trained: bool = False


class ChatFormatError(ValueError):
  pass


def conversation(user: str, system: str = '') -> list[dict[str, str]]:
  return ([{'role': 'system', 'content': system}] if system else []) + [{'role': 'user', 'content': user}]


def check_messages(messages: Sequence[dict], for_training: bool = True):
  """Roles known, an optional leading system turn, then user/assistant alternating."""
  if not messages:
    raise ChatFormatError('conversation has no messages')
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or 'role' not in m or 'content' not in m:
      raise ChatFormatError(f'message {i} must be an object with "role" and "content"')
    if m['role'] not in ROLES:
      raise ChatFormatError(f'message {i} has unknown role {m["role"]!r}; expected one of {ROLES}')
    if not isinstance(m['content'], str):
      raise ChatFormatError(f'message {i} ({m["role"]}) content must be a string')
  turns = messages[1:] if messages[0]['role'] == 'system' else messages
  for i, m in enumerate(turns):
    expected = 'user' if i % 2 == 0 else 'assistant'
    if m['role'] != expected:
      raise ChatFormatError(f'message {messages.index(m)} is {m["role"]!r} where {expected!r} was '
                            'expected (after an optional system message, user and assistant alternate)')
  if for_training:
    answers = [m for m in turns if m['role'] == 'assistant']
    if not answers:
      raise ChatFormatError('conversation has no assistant message to learn from')
    for m in answers:
      if not m['content'].strip():
        raise ChatFormatError(f'message {messages.index(m)} is an empty assistant answer')


class Template:
  name = ''
  stop_tokens: tuple[str, ...] = (EOS,)

  def pieces(self, messages: Sequence[dict], add_generation_prompt: bool) -> list[Piece]:
    raise NotImplementedError

  @staticmethod
  def _split(messages):
    """(system text or '', the user/assistant turns)."""
    if messages and messages[0]['role'] == 'system':
      return messages[0]['content'], messages[1:]
    return '', messages

  def _token_id(self, tokenizer: Tokenizer, token: str) -> int:
    if token == BOS:
      return tokenizer.bos_id
    if token == EOS:
      return tokenizer.eos_id
    i = tokenizer.token_id(token)
    if i is None:
      raise ChatFormatError(f'chat template {self.name!r} needs the special token {token!r}, which '
                            f'tokenizer {tokenizer.path} does not have as a single token')
    return i

  def _encode(self, tokenizer: Tokenizer, pieces: list[Piece]) -> tuple[list[int], list[int]]:
    texts = [p.text for p in pieces if not p.token]
    encoded = iter(tokenizer.encode_batch(texts)) if texts else iter(())
    ids, mask = [], []
    for p in pieces:
      piece_ids = [self._token_id(tokenizer, p.token)] if p.token else next(encoded)
      ids += piece_ids
      mask += [int(p.trained)] * len(piece_ids)
    return ids, mask

  def encode(self, tokenizer: Tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """A training example: (token ids, mask) with mask 1 exactly on the tokens to learn."""
    check_messages(messages)
    if messages[-1]['role'] != 'assistant':
      raise ChatFormatError('a training conversation must end with an assistant message')
    return self._encode(tokenizer, self.pieces(messages, add_generation_prompt=False))

  def prompt_ids(self, tokenizer: Tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids for generation: the conversation so far (ending with a user turn), then the start
    of the assistant's answer."""
    check_messages(messages, for_training=False)
    if messages[-1]['role'] != 'user':
      raise ChatFormatError('a prompt must end with a user message')
    return self._encode(tokenizer, self.pieces(messages, add_generation_prompt=True))[0]

  def stop_ids(self, tokenizer: Tokenizer) -> list[int]:
    return [self._token_id(tokenizer, t) for t in self.stop_tokens]


class Llama2(Template):
  """Meta's Llama 2 chat format: <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>."""
  name = 'llama2'

  def pieces(self, messages, add_generation_prompt):
    system, turns = self._split(messages)
    out = []
    for i in range(0, len(turns), 2):
      user = turns[i]['content'].strip()
      if i == 0 and system:
        user = f'<<SYS>>\n{system.strip()}\n<</SYS>>\n\n{user}'
      out += [Piece(token=BOS), Piece(f'[INST] {user} [/INST]')]
      if i + 1 < len(turns):
        out += [Piece(turns[i + 1]['content'].strip(), trained=True), Piece(token=EOS, trained=True)]
    return out


class Mistral(Template):
  """Mistral instruct: <s>[INST] {system}\\n\\n{user} [/INST] {answer}</s>[INST] ... (one BOS)."""
  name = 'mistral'

  def pieces(self, messages, add_generation_prompt):
    system, turns = self._split(messages)
    out = [Piece(token=BOS)]
    for i in range(0, len(turns), 2):
      user = turns[i]['content'].strip()
      if i == 0 and system:
        user = f'{system.strip()}\n\n{user}'
      out.append(Piece(f'[INST] {user} [/INST]'))
      if i + 1 < len(turns):
        out += [Piece(turns[i + 1]['content'].strip(), trained=True), Piece(token=EOS, trained=True)]
    return out


class Llama3(Template):
  """Llama 3 header tokens: <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>."""
  name = 'llama3'
  stop_tokens = ('<|eot_id|>', '<|end_of_text|>')

  def pieces(self, messages, add_generation_prompt):
    out = [Piece(token='<|begin_of_text|>')]
    for m in messages:
      trained = m['role'] == 'assistant'
      out += [Piece(token='<|start_header_id|>'), Piece(m['role']), Piece(token='<|end_header_id|>'),
              Piece('\n\n'), Piece(m['content'].strip(), trained=trained),
              Piece(token='<|eot_id|>', trained=trained)]
    if add_generation_prompt:
      out += [Piece(token='<|start_header_id|>'), Piece('assistant'), Piece(token='<|end_header_id|>'),
              Piece('\n\n')]
    return out

  def stop_ids(self, tokenizer):
    ids = [self._token_id(tokenizer, '<|eot_id|>')]
    end = tokenizer.token_id('<|end_of_text|>')
    return ids + ([end] if end is not None else [])


class ChatML(Template):
  """ChatML (Qwen and others): <|im_start|>{role}\\n{content}<|im_end|>\\n."""
  name = 'chatml'
  stop_tokens = ('<|im_end|>',)

  def pieces(self, messages, add_generation_prompt):
    out = []
    for m in messages:
      trained = m['role'] == 'assistant'
      out += [Piece(token='<|im_start|>'), Piece(f"{m['role']}\n"),
              Piece(m['content'].strip(), trained=trained), Piece(token='<|im_end|>', trained=trained),
              Piece('\n')]
    if add_generation_prompt:
      out += [Piece(token='<|im_start|>'), Piece('assistant\n')]
    return out


class Alpaca(Template):
  """The Stanford Alpaca prompt: a preamble, ### Instruction:, ### Response:, then the answer + EOS."""
  name = 'alpaca'
  PREAMBLE = ('Below is an instruction that describes a task. '
              'Write a response that appropriately completes the request.')

  def pieces(self, messages, add_generation_prompt):
    system, turns = self._split(messages)
    out = [Piece(token=BOS)]
    preamble = (system or self.PREAMBLE).strip()
    for i in range(0, len(turns), 2):
      head = f'{preamble}\n\n' if i == 0 else '\n\n'
      out.append(Piece(f"{head}### Instruction:\n{turns[i]['content'].strip()}\n\n### Response:\n"))
      if i + 1 < len(turns):
        out += [Piece(turns[i + 1]['content'].strip(), trained=True), Piece(token=EOS, trained=True)]
    return out


TEMPLATES = {t.name: t for t in (Llama2(), Mistral(), Llama3(), ChatML(), Alpaca())}


def get_template(name: str) -> Template:
  if name not in TEMPLATES:
    raise ValueError(f'Unknown chat template {name!r}; known: {sorted(TEMPLATES)}')
  return TEMPLATES[name]

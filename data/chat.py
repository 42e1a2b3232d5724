"""Chat templates: conversations -> token ids and an exact loss mask; prompts and stop ids for generation;
and `python -m data.chat` to see what a template trains before spending a TPU-day.

A template is Jinja, rendered exactly as transformers' `apply_chat_template` renders it (the same
sandboxed environment, options, globals and variables), and the rendered string is tokenized as
transformers tokenizes it (`Tokenizer.encode_chat`), so that a model is tuned in the format its serving
stack (transformers, vLLM, TGI, llama.cpp) renders from tokenizer_config.json. `data.chat_template` names
one of the built-in templates (data/chat_templates/NAME.jinja, written from each format's published
description), `tokenizer` (the template of the tokenizer's folder), or a .jinja file.

The loss mask is 1 on the tokens of every assistant message and the end-of-turn token(s) after it, 0
elsewhere. It comes from character spans of the rendered string: the `{% generation %}` blocks where
the template has them (the built-ins do), else, for each assistant message, the text the template adds
for it after the conversation before it with the generation prompt, up to the last special token it
writes (its end of turn; the newline after ChatML's <|im_end|> is not trained). A token is trained when
its characters overlap a span, so a token that straddles a boundary is trained. A template that renders
earlier turns differently once later ones follow (one that drops earlier reasoning, say) cannot give such
spans: that is an error naming the message, unless `per_turn` makes one example per assistant message.

The one intended difference from transformers: special-token text inside a message ("<|im_end|>" typed
by a user) stays text, as transformers' `sanitize_control_tokens=True` keeps it; the special tokens
that the template itself writes are single tokens (added tokens that are not special, such as Qwen3's
<think>, are matched everywhere, as by transformers). No TensorFlow here: generation uses this module.
"""

import functools
import json
import os
import re
import sys
import threading
from datetime import datetime
from typing import Any, NamedTuple, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
from absl import app, flags, logging
from etils import epath
from jinja2.sandbox import ImmutableSandboxedEnvironment

from data import records
from data.tokenizer import CHAT_SPECIAL_TOKENS as _MARKERS
from data.tokenizer import Tokenizer, load_tokenizer
import runtime

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'chat_templates')
# The built-in templates (TEMPLATE_DIR/NAME.jinja) and the special tokens each needs the tokenizer to
# have as special tokens (as text they would mean nothing to the model).
BUILTIN = {'llama2': (), 'llama3': _MARKERS['llama3'], 'llama3.1': _MARKERS['llama3'], 'mistral': (),
           'mistral-v3': _MARKERS['mistral-v3'], 'chatml': _MARKERS['chatml'],
           'qwen2.5': _MARKERS['chatml'], 'alpaca': ()}
# Without data.chat_template: the tokenizer folder's own template, or else this one.
FALLBACK = 'llama2'
_GENERATION_TAG = re.compile(r'\{%-?\s*generation\s*-?%\}')  # as transformers detects them
# transformers' markers (chat_template_utils): special-token text of a message sits between them while
# the template renders, so that it can be told from the special tokens the template writes.
_START, _END = '\U000F0000', '\U000F0001'


class ChatFormatError(ValueError):
  pass


def conversation(user: str, system: str = '') -> list[dict[str, str]]:
  return ([{'role': 'system', 'content': system}] if system else []) + [{'role': 'user', 'content': user}]


# --------------------------------------------------------------------------------------------------
# Rendering, as transformers 5 does (utils/chat_template_utils.py)

_tracking = threading.local()  # what the {% generation %} tag records during a render


class _GenerationTracker(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}` renders its body unchanged and records where that text
  lands in the output (transformers' AssistantTracker)."""
  tags = {'generation'}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(('name:endgeneration',), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method('_track'), [], [], body).set_lineno(lineno)

  def _track(self, caller):
    text = caller()
    blocks = getattr(_tracking, 'blocks', None)
    if blocks is not None:
      start = sum(map(len, blocks))  # the output yielded so far
      _tracking.spans.append((start, start + len(text), text))
    return text


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format_string):
  return datetime.now().strftime(format_string)


@functools.cache
def _environment() -> jinja2.Environment:
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[_GenerationTracker, jinja2.ext.loopcontrols])
  env.filters['tojson'] = _tojson
  env.globals['raise_exception'] = _raise_exception
  env.globals['strftime_now'] = _strftime_now
  return env


def _template_line(error: BaseException) -> str:
  line = getattr(error, 'lineno', None)
  tb = error.__traceback__
  while tb is not None:  # jinja2 maps the frames of template code to template lines
    if tb.tb_frame.f_code.co_filename == '<template>':
      line = tb.tb_lineno
    tb = tb.tb_next
  return f' (template line {line})' if line else ''


def _mark(value: Any, pattern: re.Pattern | None) -> Any:
  """`value` (messages) with its special-token text between the markers, and None values dropped."""
  if isinstance(value, str):
    value = value.replace(_START, '').replace(_END, '')
    return pattern.sub(f'{_START}\\g<0>{_END}', value) if pattern else value
  if isinstance(value, dict):
    return {k: _mark(v, pattern) for k, v in value.items() if v is not None}
  if isinstance(value, (list, tuple)):
    return [_mark(v, pattern) for v in value]
  return value


def _unmark(text: str) -> tuple[str, list[tuple[int, int]], np.ndarray | None]:
  """(text without the markers, the ranges of marked text in it, marked offset -> clean offset)."""
  if _START not in text and _END not in text:
    return text, [], None
  clean, plain, index, opened = [], [], np.zeros(len(text) + 1, np.int64), None
  for i, c in enumerate(text):
    index[i] = len(clean)
    if c == _START:
      opened = len(clean)
    elif c == _END:
      if opened is not None and opened < len(clean):
        plain.append((opened, len(clean)))
      opened = None
    else:
      clean.append(c)
  index[len(text)] = len(clean)
  return ''.join(clean), plain, index


# --------------------------------------------------------------------------------------------------
# Templates


class Example(NamedTuple):
  """A training example: token ids, the loss mask (1: a token to learn), and for a person to read, the
  rendered text and each token's (start, end) characters in it."""
  ids: list[int]
  mask: list[int]
  text: str = ''
  offsets: Sequence[tuple[int, int]] = ()

  def show(self, color: bool = False) -> str:
    """The text, with the characters of trained tokens highlighted (color) or between ⟦ and ⟧."""
    trained = np.zeros(len(self.text) + 1, bool)
    for (start, end), m in zip(self.offsets, self.mask):
      trained[start:end] |= bool(m)
    out, opened = [], False
    for i, c in enumerate(self.text + '\0'):
      if trained[i] != opened:
        opened = bool(trained[i])
        out.append(('\x1b[42m' if opened else '\x1b[0m') if color else ('⟦' if opened else '⟧'))
      out.append(c)
    return ''.join(out[:-1])


class ChatTemplate:
  """A Jinja chat template bound to a tokenizer: what SFT, generation, evaluation and export use."""

  def __init__(self, source: str, name: str, tokenizer: Tokenizer, variables: dict | None = None,
               per_turn: bool = False):
    self.source, self.name, self.tokenizer, self.per_turn = source, name, tokenizer, per_turn
    self.extra_variables = dict(variables or {})
    # transformers: the named special tokens, overridden by the caller's keyword arguments.
    self.variables = {'tools': None, 'documents': None, **tokenizer.special_tokens_map,
                      **self.extra_variables}
    self.has_generation_blocks = bool(_GENERATION_TAG.search(source))
    specials = tokenizer.special_tokens()
    self._special_ids = frozenset(specials.values())
    self._pattern = re.compile('|'.join(map(re.escape, sorted(specials, key=len, reverse=True)))
                               ) if specials else None
    try:
      self._template = _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
      raise ChatFormatError(f'chat template {name}: line {e.lineno}: {e.message}') from None

  def __repr__(self):
    return f'ChatTemplate({self.name})'

  def _render(self, messages, add_generation_prompt: bool):
    """(text with markers, [(start, end, text)] of the {% generation %} blocks) of marked messages."""
    blocks, spans = [], []
    _tracking.blocks, _tracking.spans = blocks, spans
    try:
      for block in self._template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                           **self.variables):
        blocks.append(block)
    except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError) as e:
      message = e.message if isinstance(e, jinja2.TemplateError) and e.message else str(e)
      raise ChatFormatError(f'chat template {self.name}{_template_line(e)}: {message}') from None
    finally:
      _tracking.blocks = _tracking.spans = None
    text = ''.join(blocks)
    for start, end, block in spans:
      if text[start:end] != block:
        raise ChatFormatError(f'chat template {self.name}: a {{% generation %}} block inside {{% set %}}, a '
                              'macro or a filter: its text is not where it was rendered')
    return text, [(start, end) for start, end, _ in spans]

  def standalone_source(self) -> str:
    """The template with its extra variables set inside it, for a tokenizer_config.json (serving
    stacks do not pass them)."""
    literal = lambda v: 'none' if v is None else json.dumps(v)
    sets = ''.join(f'{{%- set {k} = {literal(v)} -%}}\n' for k, v in self.extra_variables.items())
    return sets + self.source

  def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The rendered conversation, as `apply_chat_template(tokenize=False)` gives it."""
    return _unmark(self._render(_mark(list(messages), None), add_generation_prompt)[0])[0]

  def _tokens(self, text, spans=(), up_to_special=False) -> Example:
    """Tokenizes a marked rendering; mask 1 on the tokens that overlap a span (with `up_to_special`,
    only up to the last special token each span holds)."""
    clean, plain, index = _unmark(text)
    ids, offsets = self.tokenizer.encode_chat(clean, plain)
    mask = np.zeros(len(ids), np.int32)
    if ids:
      starts, ends = np.asarray(offsets, np.int64).reshape(-1, 2).T
      ends = np.maximum(ends, starts + 1)  # a byte-fallback token may be 0 characters long
      for a, b in spans:
        if index is not None:
          a, b = index[a], index[b]
        hit = np.flatnonzero((starts < b) & (ends > a))
        if up_to_special and hit.size:
          special = [i for i in hit if ids[i] in self._special_ids]
          hit = hit[hit <= special[-1]] if special else hit
        mask[hit] = 1
    return Example(ids, mask.tolist(), clean, offsets)

  def _turn_span(self, messages, text, i) -> tuple[int, int]:
    """Characters of `text` (the rendering of marked `messages`) that the template adds for assistant
    message i after the prompt for it."""
    prompt = self._render(messages[:i], add_generation_prompt=True)[0]
    upto = self._render(messages[:i + 1], add_generation_prompt=False)[0]
    if not upto.startswith(prompt):
      raise ChatFormatError(
          f'chat template {self.name} cannot place assistant message {i}: the messages before it, rendered '
          'with the generation prompt, are not the start of the conversation up to it (the prompt a model '
          'gets would not be what precedes the answer in training)')
    if not text.startswith(upto):
      raise ChatFormatError(
          f'chat template {self.name} renders the conversation up to message {i} differently once later '
          'messages follow (it is not prefix-stable, e.g. it drops the reasoning of earlier answers), so '
          'its answers cannot be masked in one example: set data.chat_per_turn=True (--per-turn) for '
          'one example per assistant message, or add {% generation %} blocks to the template')
    if len(upto) == len(prompt):
      raise ChatFormatError(f'chat template {self.name} renders nothing for assistant message {i}')
    return len(prompt), len(upto)

  def _example(self, messages, first: int = 0) -> Example:
    """The example of `messages`, trained on its assistant messages from index `first` on."""
    marked = _mark(messages, self._pattern)
    text, spans = self._render(marked, add_generation_prompt=False)
    turns = [i for i, m in enumerate(messages) if m['role'] == 'assistant' and i >= first]
    if self.has_generation_blocks:  # a block per assistant message: the last len(turns) are trained
      return self._tokens(text, spans if first == 0 else spans[len(spans) - len(turns):] if turns else [])
    return self._tokens(text, [self._turn_span(marked, text, i) for i in turns], up_to_special=True)

  def examples(self, messages: Sequence[dict]) -> list[Example]:
    """The training examples of a conversation: one, or with `per_turn` one per assistant message
    (the conversation up to it, only it trained). The mask is all 0 without an assistant message."""
    messages = check_messages(messages)
    turns = [i for i, m in enumerate(messages) if m['role'] == 'assistant']
    if not self.per_turn or not turns:
      return [self._example(messages)]
    return [self._example(messages[:i + 1], first=i) for i in turns]

  def completion_example(self, prompt: Sequence[dict], completion: Sequence[dict]) -> Example:
    """`prompt` followed by `completion` as one example, trained on the assistant messages of the
    completion only (not on earlier answers in the prompt): one side of a preference pair."""
    return self._example(check_messages(list(prompt) + list(completion)), first=len(prompt))

  def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
    """Token ids for generation: the conversation up to its last user message, then the generation
    prompt (the start of the assistant's answer, where the template has one)."""
    messages = check_messages(messages, for_training=False)
    last_user = max((i for i, m in enumerate(messages) if m['role'] == 'user'), default=None)
    if last_user is None:
      raise ChatFormatError('a prompt needs a user message')
    marked = _mark(messages[:last_user + 1], self._pattern)
    return self._tokens(self._render(marked, add_generation_prompt=True)[0]).ids

  @functools.cached_property
  def stop_ids(self) -> list[int]:
    """Where generation stops: the special tokens that end the trained part of an answer (the end of
    turn: <|eot_id|>, <|im_end|>, </s>), and EOS."""
    probe = [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}]
    try:
      example = self._example(probe)
    except ChatFormatError as e:
      logging.warning('Chat template %s: cannot tell its end-of-turn tokens (%s); stopping at EOS',
                      self.name, e)
      return [self.tokenizer.eos_id]
    trained = [i for i, m in zip(example.ids, example.mask) if m]
    end = []
    while trained and trained[-1] in self._special_ids:
      end.insert(0, trained.pop())
    return list(dict.fromkeys(end + [self.tokenizer.eos_id]))


def check_messages(messages: Any, for_training: bool = True) -> list[dict]:
  """A list of {"role", "content"} objects with string values (the template judges the roles)."""
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ChatFormatError('a conversation must be a non-empty list of messages')
  for i, m in enumerate(messages):
    if not (isinstance(m, dict) and isinstance(m.get('role'), str) and isinstance(m.get('content'), str)):
      raise ChatFormatError(f'message {i} must be an object with a string "role" and "content"')
    if for_training and m['role'] == 'assistant' and not m['content'].strip():
      raise ChatFormatError(f'message {i} is an empty assistant answer')
  return list(messages)


# --------------------------------------------------------------------------------------------------
# Where templates come from


def tokenizer_templates(folder: str) -> tuple[dict[str, str], str]:
  """The chat templates of a tokenizer folder, by name, and the file they come from, as transformers
  finds them: chat_template.jinja ('default') and additional_chat_templates/*.jinja, else the
  "chat_template" of tokenizer_config.json (a string, or a list of {"name", "template"})."""
  folder = epath.Path(folder)
  found = {}
  if (folder / 'chat_template.jinja').exists():
    found['default'] = (folder / 'chat_template.jinja').read_text(encoding='utf-8')
  if (folder / 'additional_chat_templates').is_dir():
    for path in sorted((folder / 'additional_chat_templates').glob('*.jinja')):
      found[path.stem] = path.read_text(encoding='utf-8')
  if found:
    return found, str(folder / ('chat_template.jinja' if 'default' in found else 'additional_chat_templates'))
  config_path = folder / 'tokenizer_config.json'
  if not config_path.exists():
    return {}, str(config_path)
  template = json.loads(config_path.read_text(encoding='utf-8')).get('chat_template')
  if isinstance(template, list):
    return {t['name']: t['template'] for t in template}, str(config_path)
  return ({'default': template} if isinstance(template, str) else {}), str(config_path)


def load_template(spec: str, tokenizer: Tokenizer, template_name: str = '', variables: dict | None = None,
                  per_turn: bool = False) -> ChatTemplate:
  """`spec`: a built-in name, 'tokenizer' (the tokenizer folder's template, `template_name` or
  'default'), a .jinja file, or '' (the tokenizer folder's template if it has one, else FALLBACK)."""
  folder = os.path.dirname(tokenizer.path)
  if not spec:
    spec = 'tokenizer' if tokenizer_templates(folder)[0] else FALLBACK
  if spec in BUILTIN:
    source, name = (epath.Path(TEMPLATE_DIR) / f'{spec}.jinja').read_text(encoding='utf-8'), spec
  elif spec == 'tokenizer':
    found, where = tokenizer_templates(folder)
    template_name = template_name or 'default'
    if template_name not in found:
      raise ChatFormatError(f'chat template "tokenizer": {where} has no chat template named '
                            f'{template_name!r}' + (f' (it has {sorted(found)})' if found else ''))
    source, name = found[template_name], f'{template_name!r} of {where}'
  elif spec.endswith('.jinja') or epath.Path(spec).is_file():
    if not epath.Path(spec).is_file():
      raise ChatFormatError(f'chat template file not found: {spec}')
    source, name = epath.Path(spec).read_text(encoding='utf-8'), spec
  else:
    raise ChatFormatError(f'unknown chat template {spec!r}; known: {", ".join(BUILTIN)}, "tokenizer" (the '
                          "tokenizer folder's own), or a path to a .jinja file")
  template = ChatTemplate(source, name, tokenizer, variables, per_turn)
  specials = tokenizer.special_tokens()
  missing = [t for t in BUILTIN.get(spec, ()) if t not in specials]
  if missing:
    raise ChatFormatError(f'chat template {spec} needs the special tokens {missing}, which tokenizer '
                          f'{tokenizer.path} does not have as special tokens')
  logging.info('Chat template: %s%s', name, ' (one example per assistant message)' if per_turn else '')
  return template


def parse_variables(value: Any, where: str) -> dict:
  """Extra template variables: a dict, or a JSON object as text ('' for none)."""
  if isinstance(value, str):
    try:
      value = json.loads(value) if value.strip() else {}
    except json.JSONDecodeError as e:
      raise ChatFormatError(f'{where}: expected a JSON object, got {value!r} ({e.msg})') from None
  if not isinstance(value, dict) or not all(isinstance(k, str) and k.isidentifier() for k in value):
    raise ChatFormatError(f'{where}: expected a JSON object of template variables, got {value!r}')
  return dict(value)


def from_config(data_config: Any, tokenizer: Tokenizer) -> ChatTemplate:
  """The template that `config.data` (chat_template, chat_template_name, chat_template_kwargs,
  chat_per_turn) names."""
  variables = parse_variables(data_config.chat_template_kwargs, 'config.data.chat_template_kwargs')
  return load_template(data_config.chat_template, tokenizer, data_config.chat_template_name, variables,
                       data_config.chat_per_turn)


# --------------------------------------------------------------------------------------------------
# Command lines: the template flags of every command that takes one, and `python -m data.chat`

FLAGS = flags.FLAGS


def define_template_flags(help_text: str, required: bool = False):
  """--chat-template, --chat-template-name and --chat-template-kwargs (for model.generate, ...)."""
  flags.DEFINE_string('chat_template', None if required else '', help_text + ' A built-in name ('
                      f'{", ".join(BUILTIN)}), "tokenizer" (the template in the tokenizer\'s folder) or a '
                      '.jinja file.', required=required)
  flags.DEFINE_string('chat_template_name', '', 'With --chat-template tokenizer: which of the folder\'s '
                      'named templates (default: "default").')
  flags.DEFINE_string('chat_template_kwargs', '', 'Extra template variables as a JSON object, e.g. '
                      '\'{"date_string": "01 Jan 2025"}\'.')
  for name in ('chat_template', 'chat_template_name', 'chat_template_kwargs'):
    flags.DEFINE_alias(name.replace('_', '-'), name)


def template_from_flags(tokenizer: Tokenizer, per_turn: bool = False,
                        none_if_unset: bool = True) -> ChatTemplate | None:
  """The template the flags of `define_template_flags` name. Without --chat-template: None, or (not
  `none_if_unset`) the tokenizer folder's own, else FALLBACK."""
  if not FLAGS.chat_template and none_if_unset:
    return None
  try:
    return load_template(FLAGS.chat_template, tokenizer, FLAGS.chat_template_name,
                         parse_variables(FLAGS.chat_template_kwargs, '--chat-template-kwargs'), per_turn)
  except ChatFormatError as e:
    raise app.UsageError(str(e)) from None


def read_conversations(path: str, limit: int = 0) -> list[tuple[str, list[dict]]]:
  """(file:line, messages) for each record of a chat JSONL file ({"messages": [...]}); the first `limit`
  (0: all)."""
  out = []
  with epath.Path(path).open('rb') as f:
    for where, raw, offset in records.lines(f, path):
      text = records.decode(raw, where, offset)
      if not text.strip():
        continue
      record = records.parse_json(text, where)
      if not isinstance(record, dict) or 'messages' not in record:
        raise records.BadRecord(f'{where}: expected an object with "messages"')
      out.append((where, record['messages']))
      if len(out) == limit:
        break
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {list(argv[1:])}')
  tokenizer = load_tokenizer(FLAGS.tokenizer)
  template = template_from_flags(tokenizer, FLAGS.per_turn, none_if_unset=False)
  try:
    conversations = read_conversations(FLAGS.input, FLAGS.limit)
  except records.BadRecord as e:
    raise SystemExit(str(e)) from None
  out = epath.Path(FLAGS.output).open('w') if FLAGS.output else None
  n_examples = n_empty = 0
  try:
    for where, messages in conversations:
      try:
        examples = template.examples(messages)
        prompt = template.prompt_ids(messages) if any(m.get('role') == 'user' for m in messages) else []
      except ChatFormatError as e:
        raise SystemExit(f'{where}: {e}') from None
      for example in examples:
        n_examples += 1
        n_empty += not any(example.mask)
        if out:
          out.write(json.dumps({'line': int(where.rsplit(':', 1)[1]), 'ids': example.ids,
                                'mask': example.mask, 'prompt_ids': prompt}) + '\n')
        if FLAGS.show:
          print(f'--- {where}: {len(example.ids)} tokens, {sum(example.mask)} trained')
          print(example.show(color=sys.stdout.isatty()))
  finally:
    if out:
      out.close()
  print(f'{n_examples} examples with chat template {template.name}; {n_empty} with nothing to train'
        + (f'; wrote {FLAGS.output}' if FLAGS.output else ''))
  if n_examples and n_empty == n_examples:
    raise app.UsageError('no example has a token to train (is any message\'s role "assistant"?)')


def define_flags():
  flags.DEFINE_string('tokenizer', None, 'SentencePiece .model, HF tokenizer.json, or a folder holding '
                      'one.', required=True)
  define_template_flags('The chat template (default: the tokenizer folder\'s own, else llama2).')
  flags.DEFINE_string('input', None, 'Chat JSONL: {"messages": [{"role", "content"}, ...]} per line.',
                      required=True)
  flags.DEFINE_string('output', '', 'Write {"line", "ids", "mask", "prompt_ids"} per example here '
                      '(JSONL; prompt_ids: the conversation up to its last user message, with the '
                      'generation prompt).')
  flags.DEFINE_bool('show', False, 'Print each rendering, the trained tokens marked.')
  flags.DEFINE_bool('per_turn', False, 'One example per assistant message (data.chat_per_turn).')
  flags.DEFINE_integer('limit', 0, 'Only the first N conversations of --input (0: all).', lower_bound=0)
  flags.DEFINE_alias('per-turn', 'per_turn')


if __name__ == '__main__':
  define_flags()
  runtime.run(main)

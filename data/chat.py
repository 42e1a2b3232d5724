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
import inspect
import itertools
import json
import math
import os
import re
import sys
import threading
import types
from datetime import datetime
from typing import Any, NamedTuple, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.runtime
import jinja2.utils
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
  if not isinstance(format_string, str) or len(format_string) > 1000:
    raise TemplateLimitError('strftime_now takes a format of at most 1000 characters')
  return datetime.now().strftime(format_string)


# --------------------------------------------------------------------------------------------------
# Bounds on rendering. A template from a model hub (the one in a downloaded tokenizer_config.json is
# used by default) is code someone else wrote: the sandbox keeps it from reaching anything, and these
# keep one rendering from taking unbounded memory or time. Every operation of a template that can make
# or read much passes through one of the environment's hooks below (operators, calls, filters, tests,
# subscripts, comparisons, loops, output), which counts it against the rendering's budget and refuses
# it, before it runs where its size can be told in advance, once the budget is spent. Each budget is a
# base plus a multiple of the conversation's own size, so that no conversation is too long for a
# template that does ordinary things with it, and a hostile template is stopped early on a short one.

MAX_TEMPLATE_CHARS = 2**20          # the source of a template
_BASE_STEPS, _STEPS_PER_INPUT_ITEM = 2**18, 64     # loop iterations, calls, operators, outputs
_BASE_WORK, _WORK_PER_INPUT_BYTE = 2**25, 16       # bytes the template's operations make or read
_BASE_RENDERED, _RENDERED_PER_INPUT_BYTE = 2**22, 4  # characters of the rendered text
MAX_INT_BITS = 2**16                # integers that `*` and `**` may make
_ITEM_BYTES = 64                    # a new string in a list: its object and its pointer


class TemplateLimitError(jinja2.exceptions.SecurityError):
  """A rendering went past one of its bounds."""


class _Budget:
  """What one rendering may still do."""

  def __init__(self, steps: float, work: float, rendered: float):
    self.max_steps, self.max_work, self.max_rendered = steps, work, rendered
    self.steps, self.work = steps, work

  @classmethod
  def for_input(cls, *inputs) -> '_Budget':
    nbytes = nodes = 0
    for value in inputs:
      b, n, _ = _measure(value)
      nbytes, nodes = nbytes + b, nodes + n
    return cls(_BASE_STEPS + _STEPS_PER_INPUT_ITEM * nodes, _BASE_WORK + _WORK_PER_INPUT_BYTE * nbytes,
               _BASE_RENDERED + _RENDERED_PER_INPUT_BYTE * nbytes)

  def step(self):
    self.steps -= 1
    if self.steps < 0:
      raise TemplateLimitError(f'more than {self.max_steps:,} loop iterations, calls and operations in one '
                               'rendering of this conversation (a loop without end, or loops nested too '
                               'deep?)')

  def charge(self, nbytes: float, what: str):
    self.work -= nbytes
    if self.work < 0:
      raise TemplateLimitError(f'{what} would take its rendering past {self.max_work:,} bytes made or read '
                               '(a string or list multiplied, padded or doubled without bound?)')


_UNBOUNDED = _Budget(math.inf, math.inf, math.inf)  # outside a rendering (constant folding)


def _budget() -> _Budget:
  return getattr(_tracking, 'budget', None) or _UNBOUNDED


_CONTAINERS = (list, tuple, dict, set, frozenset)


def _nbytes(value: Any) -> int:
  """Bytes of `value` itself, in constant time (0 for what is not a string or a container)."""
  return sys.getsizeof(value) if isinstance(value, (str, bytes, *_CONTAINERS)) else 0


def _made_bytes(value: Any) -> int:
  """What an operation that returned `value` may have made: a list or tuple's items may be new objects
  (the characters of a string, the parts of a split)."""
  return len(value) * _ITEM_BYTES if isinstance(value, (list, tuple)) else _nbytes(value)


def _measure(value: Any, limit: float = math.inf, what: str = '') -> tuple[int, int, int]:
  """(bytes, objects, depth) of `value` and everything in it, a shared part counted each time it occurs
  (as str() and json.dumps write it: a list that holds one list twice, which holds one twice, and so
  on forty times, writes out 2**40 copies). Stops with a TemplateLimitError once past `limit` bytes;
  the walk's own memory is its depth."""
  total = nodes = depth = 0
  stack = [iter((value,))]
  while stack:
    x = next(stack[-1], _END_OF_LEVEL)
    if x is _END_OF_LEVEL:
      stack.pop()
      continue
    nodes += 1
    depth = max(depth, len(stack))
    if isinstance(x, (str, bytes, int, float)):
      total += sys.getsizeof(x)
    elif isinstance(x, dict):
      total += sys.getsizeof(x)
      stack.append(itertools.chain.from_iterable(x.items()))
    elif isinstance(x, (list, tuple, set, frozenset)):
      total += sys.getsizeof(x)
      stack.append(iter(x))
    elif isinstance(x, jinja2.utils.Namespace):
      stack.append(iter((getattr(x, '_Namespace__attrs', {}),)))
    else:
      total += _ITEM_BYTES
    if total > limit:
      raise TemplateLimitError(f'{what or "a value"} would take its rendering past '
                               f'{_budget().max_work:,} bytes made or read (a structure that holds the '
                               'same parts many times over?)')
  return total, nodes, depth


_END_OF_LEVEL = object()


def _charge_deep(budget: _Budget, value: Any, what: str):
  """Charges a value that will be written out, compared or hashed whole."""
  if type(value) is str:  # the usual case, first
    budget.charge(sys.getsizeof(value), what)
  elif isinstance(value, (str, bytes)):
    budget.charge(sys.getsizeof(value), what)
  elif isinstance(value, (*_CONTAINERS, jinja2.utils.Namespace)):
    budget.charge(_measure(value, budget.work, what)[0], what)


def _width(s: Any) -> int:
  """Bytes per character that a string made from `s` may need."""
  return 1 if not isinstance(s, str) or s.isascii() else 4


def _int_arg(value: Any) -> int:
  return value if type(value) is int else 0


_PERCENT_FIELD = re.compile(r'%[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?')
_BRACE_FIELD = re.compile(r'\{[^{}]*\}')


def _format_bytes(fmt: str, values: Sequence[Any], budget: _Budget, what: str, percent: bool) -> int:
  """An upper bound of `fmt % values` (`percent`) or `fmt.format(*values)`: each field as wide as the
  widest width or precision in the format or, where the format takes them from the values ('%*d',
  '{:{}}'), among the values, plus the longest value."""
  if percent:
    fields = _PERCENT_FIELD.findall(fmt)
    numbers = [n for field in fields for n in field]
    dynamic = '*' in numbers
  else:
    fields = _BRACE_FIELD.findall(fmt)
    numbers = [n for field in fields for n in re.findall(r'\d+', field.partition(':')[2])]
    dynamic = re.search(r'\{[^{}]*:[^{}]*\{', fmt) is not None
  widest = max([int(n) if len(n) < 19 else 10**18 for n in numbers if n.isdigit()]
               + [_int_arg(v) for v in values if dynamic] + [0])
  longest = max([_measure(v, budget.work, what)[0] for v in values] + [0])
  return sys.getsizeof(fmt) + len(fields) * (widest + longest) * 4


def _split_bytes(s: str, sep: Any = None, maxsplit: int = -1) -> int:
  parts = (s.count(sep) if isinstance(sep, str) and sep else len(s) // 2) + 1
  if type(maxsplit) is int and maxsplit >= 0:
    parts = min(parts, maxsplit + 1)
  return sys.getsizeof(s) + parts * _ITEM_BYTES


def _replace_bytes(s: str, old: Any, new: Any, count: Any = -1) -> int:
  if not (isinstance(s, str) and isinstance(old, str) and isinstance(new, str)):
    return sys.getsizeof(s)
  n = len(s) + 1 if not old else s.count(old)
  if type(count) is int and count >= 0:
    n = min(n, count)
  return (len(s) + n * max(0, len(new) - len(old))) * max(_width(s), _width(new))


def _padded_bytes(s: Any, width: Any, fill: Any = ' ') -> int:
  return max(len(s) if isinstance(s, str) else 0, _int_arg(width)) * max(_width(s), _width(fill))


def _line_count(s: str) -> int:
  return sum(s.count(c) for c in '\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029') + 1


# Upper bounds of what a str method makes (bytes), before it runs, by name; the arguments as the method
# takes them. Methods not named make at most a few times what they read.
_STR_METHODS = {
    'center': _padded_bytes, 'ljust': _padded_bytes, 'rjust': _padded_bytes,
    'zfill': lambda s, width: _padded_bytes(s, width),
    'expandtabs': lambda s, tabsize=8: (len(s) + s.count('\t') * max(_int_arg(tabsize), 0)) * _width(s),
    'replace': _replace_bytes,
    'split': _split_bytes, 'rsplit': _split_bytes,
    'splitlines': lambda s, keepends=False: sys.getsizeof(s) + _line_count(s) * _ITEM_BYTES,
    'translate': lambda s, table: len(s) * 4 * max(
        [len(v) for v in table.values() if isinstance(v, str)] + [1] if isinstance(table, dict) else [1]),
    'encode': lambda s, encoding='utf-8', errors='strict': len(s) * 4,
}


def _tree_bytes_per_depth(value, indent, budget, what):
  """An upper bound of json.dumps(value, indent=indent) or pprint: each object on its own line, indented
  by its depth."""
  nbytes, nodes, depth = _measure(value, budget.work, what)
  indent = len(indent) if isinstance(indent, str) else max(_int_arg(indent), 1)
  return nbytes * 6 + nodes * (depth * indent + 2)


# Upper bounds of what a filter makes and reads (bytes), before it runs, by name; the arguments as the
# filter takes them (after jinja2's context, eval context or environment). Filters not named are
# charged for what they read, whole where they write it out, compare or hash it, and what they return.
_FILTER_BYTES = {
    'center': lambda value, width=80: _padded_bytes(value, width),
    'indent': lambda s, width=4, first=False, blank=False: (
        len(s) + _line_count(s) * (len(width) if isinstance(width, str) else _int_arg(width))) * 4
        if isinstance(s, str) else None,
    'wordwrap': lambda s, width=79, break_long_words=True, wrapstring=None, break_on_hyphens=True: (
        len(s) * (2 + (len(wrapstring) if isinstance(wrapstring, str) else 1)) * 4)
        if isinstance(s, str) else None,
    'replace': lambda s, old, new, count=None: _replace_bytes(s, old, new, -1 if count is None else count)
        if isinstance(s, str) else None,
    'format': lambda value, *args, **kwargs: _format_bytes(value, [*args, *kwargs.values()], _budget(),
                                                           "filter 'format'", True)
        if isinstance(value, str) else None,
    'join': lambda value, d='', attribute=None: (
        _measure(value, _budget().work, "filter 'join'")[0] * 6 + len(value) * _nbytes(d)),
    'batch': lambda value, linecount, fill_with=None: (
        (len(value) + max(_int_arg(linecount), 0)) * _ITEM_BYTES),
    'list': lambda value: len(value) * _ITEM_BYTES if isinstance(value, str) else None,
    'slice': lambda value, slices, fill_with=None: (len(value) + max(_int_arg(slices), 0)) * _ITEM_BYTES,
    'tojson': lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: (
        _tree_bytes_per_depth(x, indent or 0, _budget(), "filter 'tojson'")),
    'pprint': lambda value: _tree_bytes_per_depth(value, 1, _budget(), "filter 'pprint'"),
    'urlize': lambda value, trim_url_limit=None, nofollow=False, target=None, rel=None,
                     extra_schemes=None: (
        _measure(value, _budget().work, "filter 'urlize'")[0] * (8 + len(str(target or ''))
                                                                + len(str(rel or ''))) * 4),
    'urlencode': lambda value: _measure(value, _budget().work, "filter 'urlencode'")[0] * 12,
    'escape': lambda value: _measure(value, _budget().work, "filter 'escape'")[0] * 6,
    'e': lambda value: _measure(value, _budget().work, "filter 'e'")[0] * 6,
    'forceescape': lambda value: _measure(value, _budget().work, "filter 'forceescape'")[0] * 6,
}
# Filters that take apart a list or mapping without writing, comparing or hashing its items: charged
# for its length only.
_SHALLOW_FILTERS = {'length', 'count', 'first', 'last', 'default', 'd', 'list', 'reverse', 'map',
                    'select', 'reject', 'selectattr', 'rejectattr', 'attr', 'items', 'random', 'safe',
                    'batch', 'slice', 'abs', 'round', 'int', 'float', 'sum'}
# Filters that write out, compare or hash every item of an iterable: a generator is made a list first,
# so that its items can be measured.
_CONSUMING_FILTERS = {'join', 'batch', 'slice', 'sum', 'unique', 'sort', 'dictsort', 'groupby', 'min',
                      'max'}
_COMPARING_TESTS = {'==', 'eq', 'equalto', '!=', 'ne', '<', 'lt', 'lessthan', '<=', 'le', '>', 'gt',
                    'greaterthan', '>=', 'ge', 'in'}


def _pass_args(func, context) -> tuple:
  """What jinja2 passes a filter or test before its value."""
  kind = jinja2.utils._PassArg.from_obj(func)  # pylint: disable=protected-access
  if kind is jinja2.utils._PassArg.context:  # pylint: disable=protected-access
    return (context,)
  if kind is jinja2.utils._PassArg.eval_context:  # pylint: disable=protected-access
    return (context.eval_ctx,)
  if kind is jinja2.utils._PassArg.environment:  # pylint: disable=protected-access
    return (context.environment,)
  return ()


def _bounded_filter(name: str, func):
  """`func`, charged to the rendering's budget. It takes the context (which it passes on as `func`
  wants), which also keeps jinja2 from running it on constants at compile time, outside any budget."""
  estimate = _FILTER_BYTES.get(name)
  what = f"filter '{name}'"

  @jinja2.pass_context
  def bounded(context, value, *args, **kwargs):
    budget = _budget()
    budget.step()
    if name in _CONSUMING_FILTERS and not isinstance(value, (str, *_CONTAINERS, range)) and not (
        isinstance(value, jinja2.Undefined)):
      value = list(value)
    if name == 'sum' and type(kwargs.get('start', args[1] if len(args) > 1 else 0)) not in (int, float):
      raise TemplateLimitError("filter 'sum' adds numbers only here (a sum of lists or strings takes time "
                               'quadratic in their number)')
    if name in _SHALLOW_FILTERS:
      budget.charge(_nbytes(value), what)
    else:
      _charge_deep(budget, value, what)
    for arg in (*args, *kwargs.values()):
      _charge_deep(budget, arg, what)
    nbytes = estimate(value, *args, **kwargs) if estimate else None
    if nbytes is not None:  # what it makes, before it runs
      budget.charge(nbytes, what)
    result = func(*_pass_args(func, context), value, *args, **kwargs)
    if nbytes is None:
      budget.charge(_made_bytes(result), what)
    return result
  bounded.__name__, bounded.__doc__ = func.__name__, func.__doc__
  return bounded


def _bounded_test(name: str, func):
  """`func`, counted; a comparison also charged for what it compares (see _bounded_filter)."""
  what = f"test '{name}'"

  @jinja2.pass_context
  def bounded(context, value, *args, **kwargs):
    budget = _budget()
    budget.step()
    if name in _COMPARING_TESTS:
      for x in (value, *args, *kwargs.values()):
        _charge_deep(budget, x, what)
    return func(*_pass_args(func, context), value, *args, **kwargs)
  bounded.__name__, bounded.__doc__ = func.__name__, func.__doc__
  return bounded


@jinja2.pass_context
def _emit(context, value):  # pylint: disable=unused-argument
  """Each piece of output (text of the template and each {{ expression }}), into the result or into a
  {% set %} block or a macro's text: counted, and charged for what it will write."""
  budget = _budget()
  budget.step()
  _charge_deep(budget, value, 'its output')
  return value


@jinja2.pass_context
def _operand(context, value):  # pylint: disable=unused-argument
  """Each side of a comparison, and each key of a {...} literal: charged for what is compared or hashed
  (a list or tuple compares and hashes item by item)."""
  budget = _budget()
  budget.step()
  _charge_deep(budget, value, 'a comparison')
  return value


@jinja2.pass_context
def _concatenated(context, value):  # pylint: disable=unused-argument
  """Each operand of '~': charged for what it writes into the string made."""
  budget = _budget()
  budget.step()
  _charge_deep(budget, value, "'~'")
  return value


@jinja2.pass_context
def _loop_items(context, iterable):  # pylint: disable=unused-argument
  """The items of a {% for %} loop, each counted."""
  budget = _budget()
  for item in iterable:
    budget.step()
    yield item


_INTERNAL = {'flaxlm_emit': _emit, 'flaxlm_operand': _operand, 'flaxlm_concat': _concatenated,
             'flaxlm_loop': _loop_items}


def _wrap(node: jinja2.nodes.Expr, name: str) -> jinja2.nodes.Expr:
  return jinja2.nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
  """transformers' sandboxed environment, with every operation counted against the rendering's budget."""

  intercepted_binops = frozenset({'+', '*', '**', '%'})

  def _parse(self, source, name, filename):
    """The template's syntax tree, with its outputs, loops, comparisons, '~' operands and {...} keys
    passed through the counting filters above."""
    tree = super()._parse(source, name, filename)
    for node in list(tree.find_all(jinja2.nodes.Output)):
      node.nodes = [_wrap(child, 'flaxlm_emit') for child in node.nodes]
    for node in list(tree.find_all(jinja2.nodes.For)):
      node.iter = _wrap(node.iter, 'flaxlm_loop')
    for node in list(tree.find_all(jinja2.nodes.Compare)):
      node.expr = _wrap(node.expr, 'flaxlm_operand')
      for operand in node.ops:
        operand.expr = _wrap(operand.expr, 'flaxlm_operand')
    for node in list(tree.find_all(jinja2.nodes.Pair)):
      node.key = _wrap(node.key, 'flaxlm_operand')
    for node in list(tree.find_all(jinja2.nodes.Concat)):
      node.nodes = [_wrap(child, 'flaxlm_concat') for child in node.nodes]
    tree.set_environment(self)
    return tree

  def call_binop(self, context, operator, left, right):
    budget = _budget()
    budget.step()
    what = f"'{operator}'"
    sized = (str, bytes, list, tuple)
    if operator == '**' and type(left) is int and type(right) is int and right > 0 and abs(left) > 1:
      if left.bit_length() * right > MAX_INT_BITS:
        raise TemplateLimitError(f"'**' of a {left.bit_length()}-bit integer by {right:,} would make an "
                                 f'integer of more than {MAX_INT_BITS:,} bits')
    elif operator == '*' and type(left) is int and type(right) is int:
      if left.bit_length() + right.bit_length() > MAX_INT_BITS:
        raise TemplateLimitError(f"'*' of a {left.bit_length()}-bit and a {right.bit_length()}-bit integer "
                                 f'would make an integer of more than {MAX_INT_BITS:,} bits')
    elif operator == '*' and isinstance(left, sized) != isinstance(right, sized):
      seq, n = (left, right) if isinstance(left, sized) else (right, left)
      if type(n) is int and n > 1:
        per = _width(seq) if isinstance(seq, (str, bytes)) else 8
        budget.charge(len(seq) * n * per, f"'*' of a {type(seq).__name__} of {len(seq):,} by {n:,}")
    elif operator == '+' and isinstance(left, sized) and isinstance(right, sized):
      budget.charge(_nbytes(left) + _nbytes(right), what)
    elif operator == '%' and isinstance(left, str):
      values = right if isinstance(right, tuple) else list(right.values()) if isinstance(right, dict) \
          else [right]
      budget.charge(_format_bytes(left, values, budget, what, True), what)
    return super().call_binop(context, operator, left, right)

  def getitem(self, obj, argument):
    if type(argument) in (str, int):  # the usual case, first
      return super().getitem(obj, argument)
    budget = _budget()
    if isinstance(argument, tuple):
      _charge_deep(budget, argument, 'a subscript')
    result = super().getitem(obj, argument)
    if isinstance(argument, slice):
      budget.charge(_nbytes(result), 'a slice')
    return result

  def call(__self, __context, __obj, *args, **kwargs):  # pylint: disable=no-self-argument
    """Calls of methods, macros, globals and loop(...), counted and charged: what they read, and for
    the str methods that can make much more than they read (center, replace, join, format, ...) an
    upper bound of what they make, before they run."""
    budget = _budget()
    budget.step()
    name = getattr(__obj, '__name__', type(__obj).__name__)
    what = f"macro '{__obj.name}'" if isinstance(__obj, jinja2.runtime.Macro) else f"'{name}()'"
    passed = kwargs
    kwargs = {k: v for k, v in kwargs.items() if k not in ('_loop_vars', '_block_vars')}  # jinja2's own
    owner = getattr(__obj, '__self__', None)
    wrapped = getattr(__obj, '__wrapped__', None)  # the sandbox's own str.format
    estimate = None
    if isinstance(__obj, jinja2.runtime.LoopContext) and args:  # loop(children) of a recursive loop
      args = (_loop_items(__context, args[0]), *args[1:])
    elif isinstance(getattr(wrapped, '__self__', None), str):
      values = [*args, *kwargs.values()]
      if name == 'format_map' and args and isinstance(args[0], dict):
        values = list(args[0].values())
      estimate = _format_bytes(wrapped.__self__, values, budget, what, False)
    elif isinstance(owner, str) and isinstance(__obj, types.BuiltinMethodType):
      if name == 'join' and args and not isinstance(args[0], (str, *_CONTAINERS)):
        args = (list(args[0]), *args[1:])
      if name == 'join' and args:
        items = args[0]
        estimate = sum(_nbytes(x) for x in items) + len(items) * _nbytes(owner)
      elif name in _STR_METHODS:
        estimate = _STR_METHODS[name](owner, *args, **kwargs)
    elif __obj is jinja2.utils.generate_lorem_ipsum:
      bound = inspect.signature(__obj).bind(*args, **kwargs)
      bound.apply_defaults()
      estimate = _int_arg(bound.arguments['n']) * max(_int_arg(bound.arguments['min']),
                                                      _int_arg(bound.arguments['max'])) * 16
    if estimate is not None:
      budget.charge(estimate, what)
    else:
      budget.charge(_nbytes(owner), what)
      for arg in (*args, *kwargs.values()):
        _charge_deep(budget, arg, what)
    result = super().call(__context, __obj, *args, **passed)
    if estimate is None:
      budget.charge(_made_bytes(result), what)
    return result


@functools.cache
def _environment() -> jinja2.Environment:
  env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True,
                            extensions=[_GenerationTracker, jinja2.ext.loopcontrols])
  env.filters['tojson'] = _tojson
  env.globals['raise_exception'] = _raise_exception
  env.globals['strftime_now'] = _strftime_now
  env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()} | _INTERNAL
  env.tests = {name: _bounded_test(name, f) for name, f in env.tests.items()}
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
    if len(source) > MAX_TEMPLATE_CHARS:
      raise ChatFormatError(f'chat template {name} is {len(source):,} characters long; a template may have '
                            f'at most {MAX_TEMPLATE_CHARS:,}')
    try:
      self._template = _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
      raise ChatFormatError(f'chat template {name}: line {e.lineno}: {e.message}') from None
    except (RecursionError, MemoryError, SyntaxError, ValueError, ArithmeticError) as e:
      # What Python's parser and compiler say of code nested too deep, or of a number too long.
      raise ChatFormatError(f'chat template {name} cannot be compiled ({type(e).__name__}: '
                            f'{str(e).split(":")[0] or "out of memory"})') from None

  def __repr__(self):
    return f'ChatTemplate({self.name})'

  def _render(self, messages, add_generation_prompt: bool):
    """(text with markers, [(start, end, text)] of the {% generation %} blocks) of marked messages."""
    blocks, spans = [], []
    budget = _Budget.for_input(messages, self.variables)
    _tracking.blocks, _tracking.spans, _tracking.budget = blocks, spans, budget
    rendered = 0
    try:
      for block in self._template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                           **self.variables):
        rendered += len(block)
        if rendered > budget.max_rendered:
          raise TemplateLimitError(f'renders more than {budget.max_rendered:,} characters for this '
                                   'conversation')
        blocks.append(block)
    except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError,
            RecursionError, MemoryError) as e:
      message = e.message if isinstance(e, jinja2.TemplateError) and e.message else str(e)
      if isinstance(e, MemoryError):
        message = f'out of memory ({message or "MemoryError"})'
      raise ChatFormatError(f'chat template {self.name}{_template_line(e)}: {message}') from None
    finally:
      _tracking.blocks = _tracking.spans = _tracking.budget = None
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


# The deepest nesting of a message's fields (tool calls and their arguments) that is rendered.
MAX_MESSAGE_DEPTH = 64


def check_messages(messages: Any, for_training: bool = True) -> list[dict]:
  """A list of {"role", "content"} objects with string values (the template judges the roles)."""
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ChatFormatError('a conversation must be a non-empty list of messages')
  for i, m in enumerate(messages):
    if not (isinstance(m, dict) and isinstance(m.get('role'), str) and isinstance(m.get('content'), str)):
      raise ChatFormatError(f'message {i} must be an object with a string "role" and "content"')
    depth = _measure(m)[2]
    if depth > MAX_MESSAGE_DEPTH:
      raise ChatFormatError(f'message {i} is nested {depth} levels deep; at most {MAX_MESSAGE_DEPTH} are '
                            'rendered')
    if for_training and m['role'] == 'assistant' and not m['content'].strip():
      raise ChatFormatError(f'message {i} is an empty assistant answer')
  return list(messages)


# --------------------------------------------------------------------------------------------------
# Where templates come from


def _read_template(path: epath.Path) -> str:
  """A template file, a regular one (a FIFO would block the read forever) of a template's size at most."""
  local = '://' not in str(path)
  if local and not os.path.isfile(path):
    raise ChatFormatError(f'chat template {path} is not a regular file')
  size = os.path.getsize(path) if local else path.stat().length
  if size > 4 * MAX_TEMPLATE_CHARS:
    raise ChatFormatError(f'chat template {path} is {size:,} bytes; a template may have at most '
                          f'{MAX_TEMPLATE_CHARS:,} characters')
  try:
    return path.read_text(encoding='utf-8')
  except UnicodeDecodeError as e:
    raise ChatFormatError(f'chat template {path}: invalid UTF-8 at byte offset {e.start}') from None


def tokenizer_templates(folder: str) -> tuple[dict[str, str], str]:
  """The chat templates of a tokenizer folder, by name, and the file they come from, as transformers
  finds them: chat_template.jinja ('default') and additional_chat_templates/*.jinja, else the
  "chat_template" of tokenizer_config.json (a string, or a list of {"name", "template"})."""
  folder = epath.Path(folder)
  found = {}
  if (folder / 'chat_template.jinja').exists():
    found['default'] = _read_template(folder / 'chat_template.jinja')
  if (folder / 'additional_chat_templates').is_dir():
    for path in sorted((folder / 'additional_chat_templates').glob('*.jinja')):
      found[path.stem] = _read_template(path)
  if found:
    return found, str(folder / ('chat_template.jinja' if 'default' in found else 'additional_chat_templates'))
  config_path = folder / 'tokenizer_config.json'
  if not config_path.exists():
    return {}, str(config_path)
  config = records.read_json_file(str(config_path))
  template = config.get('chat_template') if isinstance(config, dict) else None
  if isinstance(template, list):
    if not all(isinstance(t, dict) and isinstance(t.get('name'), str) and isinstance(t.get('template'), str)
               for t in template):
      raise ChatFormatError(f'{config_path}: chat_template must be a string or a list of {{"name": string, '
                            '"template": string}')
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
    if not epath.Path(spec).exists():
      raise ChatFormatError(f'chat template file not found: {spec}')
    source, name = _read_template(epath.Path(spec)), spec
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
  # A bad record is an error naming its file and line.
  conversations = read_conversations(FLAGS.input, FLAGS.limit)
  out = epath.Path(FLAGS.output).open('w') if FLAGS.output else None
  n_examples = n_empty = 0
  try:
    for where, messages in conversations:
      try:
        examples = template.examples(messages)
        prompt = template.prompt_ids(messages) if any(m.get('role') == 'user' for m in messages) else []
      except ChatFormatError as e:
        raise ChatFormatError(f'{where}: {e}') from None
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

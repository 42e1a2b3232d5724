"""Reading the files of a model folder that someone else made (a model hub's download): regular files
only, JSON of bounded size that parses or says where it does not, paths that stay inside the folder,
and typed fields whose errors name the file, the key and what was expected.

Every check here happens before the file's contents drive any allocation, and every failure is a
ValueError whose message starts with the file's path, so that a command reports it as one line.
"""

import json
import math
import os
import stat
from typing import Any, BinaryIO

# The largest JSON file of a model folder read (config.json, adapter_config.json, the sharded index):
# published ones are kilobytes; the index of the largest models a few hundred.
MAX_JSON_BYTES = 16 * 2**20

_KINDS = ((stat.S_ISFIFO, 'a FIFO'), (stat.S_ISDIR, 'a folder'), (stat.S_ISSOCK, 'a socket'),
          (stat.S_ISCHR, 'a character device'), (stat.S_ISBLK, 'a block device'))


def open_regular(path: str) -> BinaryIO:
  """`path` opened for reading in binary, if it is a regular file (or a link to one); anything else is
  refused before a byte is read (opening a FIFO without O_NONBLOCK waits for a writer forever)."""
  try:
    fd = os.open(path, os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0) | getattr(os, 'O_CLOEXEC', 0))
  except IsADirectoryError:
    raise ValueError(f'{path} is a folder, not a file') from None
  try:
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
      kind = next((name for test, name in _KINDS if test(mode)), 'not a regular file')
      raise ValueError(f'{path} is {kind}, not a regular file: model folders hold only files (and links '
                       'to files)')
    # O_NONBLOCK means nothing for a regular file; clear it all the same, for what reads it next.
    if hasattr(os, 'set_blocking'):
      os.set_blocking(fd, True)
    return os.fdopen(fd, 'rb')
  except BaseException:
    os.close(fd)
    raise


def file_size(f: BinaryIO) -> int:
  return os.fstat(f.fileno()).st_size


def read_json(path: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
  """The parsed JSON file at `path`: a regular file of at most `max_bytes`, UTF-8, parseable (too deep
  a nesting, or a number of thousands of digits, is an error naming the file like any other)."""
  with open_regular(path) as f:
    size = file_size(f)
    if size > max_bytes:
      raise ValueError(f'{path} is {size:,} bytes, more than the {max_bytes:,} such a file may have')
    raw = f.read(max_bytes + 1)
  return parse_json(raw, path)


def parse_json(raw: bytes | str, where: str, **kwargs) -> Any:
  """`raw` parsed as JSON, every failure a ValueError naming `where` (json.loads raises RecursionError
  for deep nesting, and ValueError for numbers of too many digits)."""
  try:
    text = raw.decode('utf-8') if isinstance(raw, bytes) else raw
  except UnicodeDecodeError as e:
    raise ValueError(f'{where}: not UTF-8 (invalid byte at offset {e.start})') from None
  try:
    return json.loads(text, **kwargs)
  except json.JSONDecodeError as e:
    raise ValueError(f'{where}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})') from None
  except RecursionError:
    raise ValueError(f'{where}: JSON nested too deeply to parse') from None
  except ValueError as e:  # e.g. an integer of more digits than Python converts
    raise ValueError(f'{where}: malformed JSON ({str(e).split(":")[0]})') from None


def path_inside(folder: str, name: Any, where: str) -> str:
  """The path of the file `name` that `where` (an index) lists, which must stay inside `folder`: a
  relative path without '..' parts. Links inside the folder may point anywhere (the Hugging Face cache
  is made of them); the names themselves may not."""
  if not isinstance(name, str) or not name:
    raise ValueError(f'{where}: a file name must be a non-empty string, got {_shown(name)}')
  parts = name.replace('\\', '/').split('/')
  if os.path.isabs(name) or name.startswith(('/', '\\')) or (len(name) > 1 and name[1] == ':'):
    raise ValueError(f'{where}: names the file {name!r}, an absolute path; the files of a model must be '
                     'inside its folder')
  if '..' in parts or '\0' in name:
    raise ValueError(f'{where}: names the file {name!r}, outside the model folder; the files of a model '
                     'must be inside its folder')
  return os.path.join(folder, name)


def _shown(value: Any) -> str:
  text = repr(value)
  return (text[:60] + '...' if len(text) > 60 else text) + f' (a {type(value).__name__})'


_REQUIRED = object()


class Fields:
  """Typed reads of a parsed JSON object: each error names the file, the key and what was expected
  (never a KeyError of the key alone). `prefix` names a nested object (`rope_scaling.`)."""

  def __init__(self, values: Any, where: str, prefix: str = ''):
    if not isinstance(values, dict):
      raise ValueError(f'{where}: {prefix.rstrip(".") or "the file"} must be a JSON object, got '
                       f'{_shown(values)}')
    self.values, self.where, self.prefix = values, where, prefix

  def __contains__(self, key: str) -> bool:
    return key in self.values

  def get(self, key: str, default: Any = None) -> Any:
    """The raw value (None and absent alike give `default`)."""
    value = self.values.get(key)
    return default if value is None else value

  def error(self, key: str, expected: str) -> ValueError:
    if self.values.get(key) is None:
      return ValueError(f'{self.where}: {self.prefix}{key} is missing (expected {expected})')
    return ValueError(f'{self.where}: {self.prefix}{key} must be {expected}, got '
                      f'{_shown(self.values[key])}')

  def _read(self, key, default, ok, expected):
    value = self.values.get(key)
    if value is None:
      if default is _REQUIRED:
        raise self.error(key, expected)
      return default
    if not ok(value):
      raise self.error(key, expected)
    return value

  def integer(self, key: str, default: Any = _REQUIRED, minimum: int = 1) -> int:
    expected = 'a positive integer' if minimum == 1 else f'an integer >= {minimum}'
    return self._read(key, default, lambda v: type(v) is int and v >= minimum, expected)

  def number(self, key: str, default: Any = _REQUIRED, positive: bool = False) -> float:
    def ok(v):
      return type(v) in (int, float) and math.isfinite(v) and (v > 0 or not positive)
    value = self._read(key, default, ok, 'a positive number' if positive else 'a finite number')
    return value if value is default else float(value)

  def boolean(self, key: str, default: Any = _REQUIRED) -> bool:
    return self._read(key, default, lambda v: type(v) is bool, 'true or false')

  def string(self, key: str, default: Any = _REQUIRED) -> str:
    return self._read(key, default, lambda v: isinstance(v, str), 'a string')

  def strings(self, key: str) -> list[str]:
    """A list of strings (absent or null: empty)."""
    return self._read(key, [], lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                      'a list of strings')

  def mapping(self, key: str) -> 'Fields':
    """A nested object (absent or null: empty)."""
    return Fields(self._read(key, {}, lambda v: isinstance(v, dict), 'a JSON object'), self.where,
                  f'{self.prefix}{key}.')

"""The one cleaning path for input records, pretraining and instruction tuning alike.

A record is raw bytes with a provenance (`where`: 'file:line', and its byte offset in the file). It is
checked against `max_record_bytes`, decoded as UTF-8 (invalid bytes are an error naming the byte
offset, or replaced and counted) and, for JSON formats, parsed. Every problem is a `BadRecord` whose
message starts with `where`; counts of what was skipped or repaired go into a `Counters`.
"""

import collections
import json
import os
import threading
from typing import Any, BinaryIO, Iterator

from etils import epath

from data.config import UTF8_POLICIES


class BadRecord(ValueError):
  """Bad input; the message names the file and line (or byte offset) and what was expected."""


class Counters:
  """Thread-safe counts of skipped or repaired records (tf.data runs Python steps in threads)."""

  def __init__(self):
    self._counts = collections.Counter()
    self._lock = threading.Lock()

  def add(self, key: str, n: int = 1):
    with self._lock:
      self._counts[key] += n

  def snapshot(self) -> dict[str, int]:
    with self._lock:
      return dict(self._counts)


def check_policy(utf8: str):
  if utf8 not in UTF8_POLICIES:
    raise ValueError(f'config.data.invalid_utf8 must be one of {UTF8_POLICIES}, got {utf8!r}')


def decode(raw: bytes, where: str, offset: int = -1, *, utf8: str = 'error', max_record_bytes: int = 0,
           counters: Counters | None = None) -> str:
  """A record's text. `offset` is its byte offset in its file (-1 where unknown)."""
  if max_record_bytes and len(raw) > max_record_bytes:
    raise BadRecord(f'{where}: record of {len(raw):,} bytes exceeds config.data.max_record_bytes '
                    f'({max_record_bytes:,})')
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError as e:
    if utf8 != 'replace':
      at = f'byte offset {offset + e.start}' if offset >= 0 else f'byte {e.start} of the record'
      raise BadRecord(f'{where}: invalid UTF-8 at {at} (set config.data.invalid_utf8="replace" to '
                      'replace and count such bytes)') from None
    if counters:
      counters.add('invalid_utf8_replaced')
    return raw.decode('utf-8', errors='replace')


def parse_json(text: str, where: str) -> Any:
  """The parsed record; every failure a BadRecord (json.loads raises RecursionError for deep nesting,
  and a plain ValueError for a number of thousands of digits: records like any other bad one)."""
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise BadRecord(f'{where}: malformed JSON ({e.msg} at column {e.colno})') from None
  except RecursionError:
    raise BadRecord(f'{where}: JSON nested too deeply to parse') from None
  except ValueError as e:
    raise BadRecord(f'{where}: malformed JSON ({str(e).split(":")[0]})') from None


# The largest JSON file beside a tokenizer read (tokenizer_config.json of models with many added tokens
# is megabytes).
MAX_JSON_FILE_BYTES = 64 * 2**20


def read_json_file(path: str, max_bytes: int = MAX_JSON_FILE_BYTES) -> Any:
  """A JSON file someone else may have made (a tokenizer's tokenizer_config.json): local ones must be
  regular files (a FIFO would block the read forever) of at most `max_bytes`; a BadRecord names it."""
  local = '://' not in path
  if local and not os.path.isfile(path):
    raise BadRecord(f'{path} is not a regular file')
  size = os.path.getsize(path) if local else epath.Path(path).stat().length
  if size > max_bytes:
    raise BadRecord(f'{path} is {size:,} bytes, more than the {max_bytes:,} such a file may have')
  raw = epath.Path(path).read_bytes()
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise BadRecord(f'{path}: invalid UTF-8 at byte offset {e.start}') from None
  return parse_json(text, path)


def lines(f: BinaryIO, path: str) -> Iterator[tuple[str, bytes, int]]:
  """(where, raw line, byte offset) for each line of a file opened in binary mode. Lines end at '\n'
  only, as JSONL says: other Unicode line separators (U+2028 inside a JSON string) are part of it."""
  offset = 0
  for n, line in enumerate(f, 1):
    yield f'{path}:{n}', line.rstrip(b'\r\n'), offset
    offset += len(line)

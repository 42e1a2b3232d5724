"""Finding and opening input files, local or on an object store (gs://), without TensorFlow: globs
and the checks on what they match, and Parquet files for pyarrow. The pipelines (data/sources.py,
data/sft.py) and the readers that must not need TensorFlow (data/instructions.py, for evaluation
commands) share them.
"""

import contextlib
import glob as local_glob
import io
import re
from typing import Sequence

from etils import epath

from data.records import BadRecord


def glob(pattern: str) -> list[str]:
  """Files matching `pattern` (`*`, `?`, `[...]`, and `**` locally), local or on an object store."""
  if '://' not in pattern:
    return sorted(local_glob.glob(pattern, recursive=True))
  parts = pattern.split('/')
  fixed = next((i for i, part in enumerate(parts) if re.search(r'[*?[]', part)), len(parts))
  root = epath.Path('/'.join(parts[:fixed]))
  if fixed == len(parts):
    return [pattern] if root.exists() else []
  return sorted(str(p) for p in root.glob('/'.join(parts[fixed:])))


def resolve_files(patterns: str | Sequence[str]) -> list[str]:
  """Expands comma-separated paths/globs (local or gs://); every pattern must match something."""
  if isinstance(patterns, str):
    patterns = [p.strip() for p in patterns.split(',') if p.strip()]
  if not patterns:
    raise ValueError('No input files given (empty file pattern)')
  files = []
  for pattern in patterns:
    matched = glob(pattern)
    if not matched:
      raise FileNotFoundError(f'File pattern {pattern!r} matched no file')
    files.extend(matched)
  files = sorted(set(files))
  empty = [f for f in files if epath.Path(f).stat().length == 0]
  if empty:
    raise ValueError(f'{len(empty)} empty input file(s): {", ".join(empty[:5])}'
                     f'{" ..." if len(empty) > 5 else ""}; remove them or fix the pattern')
  return files


class RemoteFile(io.RawIOBase):
  """A file opened by etils.epath (on gs://, TensorFlow's GFile), as pyarrow wants one: GFile has
  no `closed`, which pyarrow checks before every read."""

  def __init__(self, f):
    super().__init__()
    self._f = f

  def readable(self):
    return True

  def seekable(self):
    return True

  def read(self, size=-1):
    return self._f.read(size)

  def readinto(self, buffer):
    data = self._f.read(len(buffer))
    buffer[:len(data)] = data
    return len(data)

  def seek(self, offset, whence=io.SEEK_SET):
    return self._f.seek(offset, whence)

  def tell(self):
    return self._f.tell()


@contextlib.contextmanager
def open_parquet(path: str):
  """A pyarrow ParquetFile, local or remote (through etils.epath); one that cannot be read as
  Parquet (another format, truncated, corrupt footer) is a BadRecord naming the file."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  with contextlib.ExitStack() as stack:
    f = RemoteFile(stack.enter_context(epath.Path(path).open('rb'))) if '://' in path else path
    try:
      parquet = pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as e:
      raise BadRecord(f'{path}: not a readable Parquet file ({one_line(e)})') from None
    stack.callback(parquet.close)
    yield parquet


def one_line(error: Exception) -> str:
  """pyarrow's message, whose parts it puts on separate lines, as one line."""
  return ' '.join(str(error).split())

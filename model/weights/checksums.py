"""Checksums of a step folder's files: the manifest written with a checkpoint, and its check.

Orbax does not checksum what it writes, so a byte flipped on disk restores silently with wrong values.
Every step folder therefore gets `checksums.json`: each file's size and the CRC32C (the checksum GCS
keeps for its objects) of each 64 MiB block of it. Training writes it into the step's temporary folder
before orbax commits the step, so that a committed step always has one (train/checkpoint.py).
Checking reads the files in blocks (never a whole file at once), many blocks in parallel threads, and
names the first damaged file and byte range; a step without a manifest (written before this existed)
is reported as unverified, not as damaged.
"""

import concurrent.futures
import dataclasses
import json
import os
from typing import Iterable, Sequence

import google_crc32c
from etils import epath

MANIFEST = 'checksums.json'
# Top-level files that orbax rewrites when it commits the step, after the manifest is written; neither
# holds data (a damaged one fails orbax's own parsing).
_WRITTEN_AT_COMMIT = ('_CHECKPOINT_METADATA', 'commit_success.txt')
ALGORITHM = 'crc32c'
BLOCK_BYTES = 64 << 20  # checksummed separately, so that one large file is checked in parallel
QUICK_BYTES = 1 << 20  # files up to this size are read by a quick check
_READ_BYTES = 8 << 20  # read at a time: memory stays at workers x 8 MiB
WORKERS = min(32, 4 * (os.cpu_count() or 1))  # threads: reads wait on storage, the hash frees the GIL


class DamagedCheckpoint(OSError):
  """A step whose files do not match its manifest: missing, of another size, or changed. `fallback`:
  the newest earlier step folder that looks intact, if the caller looked for one."""

  def __init__(self, step_dir, problems: Sequence[str], fallback=None, advice: str = ''):
    self.step_dir, self.problems, self.fallback = epath.Path(step_dir), list(problems), fallback
    more = f' (and {len(problems) - 1} more problem(s))' if len(problems) > 1 else ''
    message = (f'checkpoint step {self.step_dir.name} in {self.step_dir.parent} is damaged: '
               f'{problems[0]}{more}.')
    if fallback is not None:
      message += f' The newest earlier step that looks intact is {fallback}: use it instead.'
    else:
      message += ' There is no earlier step that looks intact.'
    super().__init__(message + (f' {advice}' if advice else ''))


@dataclasses.dataclass
class Report:
  """The result of checking a step folder: 'ok', 'unverified' (no manifest) or 'damaged'."""
  status: str
  problems: list[str]
  files: int = 0
  size: int = 0  # bytes, all files together


def _files(step_dir: epath.Path) -> dict[str, epath.Path]:
  """The files under the step folder that the manifest covers, by their path relative to it."""
  found = {}
  for root, _, names in step_dir.walk():
    for name in names:
      path = epath.Path(root) / name
      relative = os.path.relpath(str(path), str(step_dir))
      if relative not in (MANIFEST, *_WRITTEN_AT_COMMIT) and not name.endswith('.tmp'):
        found[relative] = path
  return found


def _blocks(size: int) -> list[tuple[int, int]]:
  return [(start, min(BLOCK_BYTES, size - start)) for start in range(0, size, BLOCK_BYTES)] or [(0, 0)]


def _crc(path: epath.Path, start: int, length: int) -> str:
  """CRC32C of `length` bytes of `path` from `start`, read in pieces; 'short' if the file ends early."""
  crc = 0
  with path.open('rb') as f:
    f.seek(start)
    while length > 0:
      piece = f.read(min(_READ_BYTES, length))
      if not piece:
        return 'short'
      crc = google_crc32c.extend(crc, piece)
      length -= len(piece)
  return f'{crc:08x}'


def _parallel(jobs: Iterable, fn, workers: int) -> list:
  jobs = list(jobs)
  if len(jobs) <= 1:
    return [fn(*job) for job in jobs]
  with concurrent.futures.ThreadPoolExecutor(min(workers, len(jobs))) as pool:
    return list(pool.map(lambda job: fn(*job), jobs))


def write_manifest(step_dir, workers: int = WORKERS) -> dict:
  """Checksums every file of `step_dir` and writes its manifest. Returns the manifest."""
  step_dir = epath.Path(step_dir)
  files = _files(step_dir)
  sizes = {name: path.stat().length for name, path in files.items()}
  jobs = [(name, start, length) for name in sorted(files) for start, length in _blocks(sizes[name])]
  crcs = _parallel(jobs, lambda name, start, length: _crc(files[name], start, length), workers)
  blocks = {}
  for (name, _, _), crc in zip(jobs, crcs):
    blocks.setdefault(name, []).append(crc)
  manifest = {'algorithm': ALGORITHM, 'block_bytes': BLOCK_BYTES,
              'files': {name: {'bytes': sizes[name], 'blocks': blocks[name]} for name in sorted(files)}}
  text = json.dumps(manifest, indent=1)
  if '://' in str(step_dir):
    (step_dir / MANIFEST).write_text(text)  # a single object write is atomic
  else:
    tmp = step_dir / (MANIFEST + '.tmp')
    tmp.write_text(text)
    tmp.replace(step_dir / MANIFEST)
  return manifest


def read_manifest(step_dir) -> dict | None:
  path = epath.Path(step_dir) / MANIFEST
  if not path.exists():
    return None
  try:
    manifest = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError):
    return {'unreadable': True}
  return manifest if isinstance(manifest, dict) and 'files' in manifest else {'unreadable': True}


def check(step_dir, share: tuple[int, int] = (0, 1), quick: bool = False,
          workers: int = WORKERS) -> Report:
  """Compares a step folder with its manifest. `share` = (i, n): read only every n-th block from the
  i-th (hosts split the reading; sizes are always checked in full). `quick`: sizes, and the contents
  of the small files only (metadata, read before any array), in milliseconds."""
  step_dir = epath.Path(step_dir)
  manifest = read_manifest(step_dir)
  if manifest is None:
    return Report('unverified', [f'{step_dir} has no {MANIFEST} (written before checkpoints had '
                                 'checksums, or by another tool)'])
  if manifest.get('unreadable') or manifest.get('algorithm') != ALGORITHM:
    return Report('damaged', [f'{MANIFEST} is unreadable or of an unknown kind'])
  listed = manifest['files']
  problems = []
  for name, entry in sorted(listed.items()):
    path = step_dir / name
    if not path.exists():
      problems.append(f'{name} is missing')
    elif (size := path.stat().length) != entry['bytes']:
      problems.append(f'{name} has {size:,} bytes, the manifest says {entry["bytes"]:,}'
                      + (' (truncated)' if size < entry['bytes'] else ''))
  total = sum(e['bytes'] for e in listed.values())
  if problems:
    return Report('damaged', problems, len(listed), total)
  block = manifest['block_bytes']
  jobs = [(name, i * block, min(block, entry['bytes'] - i * block), want)
          for name, entry in sorted(listed.items()) for i, want in enumerate(entry['blocks'])
          if not quick or entry['bytes'] <= QUICK_BYTES]
  index, count = share
  jobs = jobs[index::count]
  found = _parallel([(step_dir / name, start, length) for name, start, length, _ in jobs], _crc,
                    workers)
  for (name, start, length, want), got in zip(jobs, found):
    if got != want:
      problems.append(f'{name}: bytes {start:,}-{start + length:,} do not match their checksum '
                      '(the file changed after it was written)')
  return Report('damaged' if problems else 'ok', problems, len(listed), total)


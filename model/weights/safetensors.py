"""The safetensors format, read and written directly: an 8-byte header length, a JSON header naming
each tensor's dtype, shape and byte range, then the raw little-endian tensors.

Reading fills preallocated buffers a range of rows at a time, and writing streams each tensor in
blocks, so that converting a 7-8B model never holds a second copy of it; numpy has no bfloat16 of its
own (ml_dtypes has). No torch, no safetensors package.
"""

import dataclasses
import json
import math
import os
import struct
import sys
from typing import Callable, Iterator

import ml_dtypes
import numpy as np

from model.weights import untrusted

# Names in the header -> numpy dtypes.
DTYPES = {
    'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16),
    'BF16': np.dtype(ml_dtypes.bfloat16), 'I64': np.dtype(np.int64), 'I32': np.dtype(np.int32),
    'I16': np.dtype(np.int16), 'I8': np.dtype(np.int8), 'U8': np.dtype(np.uint8),
    'BOOL': np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class _Entry:
  file: str
  dtype: np.dtype
  shape: tuple[int, ...]
  begin: int  # absolute byte offsets in `file`
  end: int


class SafetensorsReader:
  """The tensors of a Hugging Face model folder (`model.safetensors` or a sharded index), read lazily.

  Every header is checked as the safetensors library checks it before any tensor is read (see
  `_read_header`), and a sharded index may name only files inside the folder."""

  def __init__(self, hf_dir: str):
    if sys.byteorder != 'little':
      raise RuntimeError('safetensors are little-endian; this reader assumes a little-endian host')
    index = os.path.join(hf_dir, 'model.safetensors.index.json')
    if os.path.lexists(index):
      weight_map = untrusted.Fields(untrusted.read_json(index), index).get('weight_map')
      if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f'{index}: weight_map must be a non-empty JSON object of tensor name -> file, got '
                         f'{type(weight_map).__name__}')
      files = sorted({untrusted.path_inside(hf_dir, f, index) for f in weight_map.values()})
    else:
      files = sorted(os.path.join(hf_dir, f) for f in os.listdir(hf_dir) if f.endswith('.safetensors'))
    if not files:
      bins = [f for f in os.listdir(hf_dir) if f.endswith(('.bin', '.pt', '.pth'))]
      hint = (f' It has PyTorch pickles ({bins[:3]}); re-save them as safetensors first, e.g. '
              '`AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR)`.' if bins else '')
      raise FileNotFoundError(f'{hf_dir}: no *.safetensors files.{hint}')
    self.entries: dict[str, _Entry] = {}
    for path in files:
      for key, entry in _read_header(path).items():
        if key in self.entries:
          raise ValueError(f'{hf_dir}: tensor {key} is stored twice ({self.entries[key].file}, {path})')
        self.entries[key] = entry

  def names_in_file_order(self) -> list[str]:
    """Tensor names sorted by file and offset, so that reading them in turn reads each file once."""
    return sorted(self.entries, key=lambda k: (self.entries[k].file, self.entries[k].begin))

  def read(self, name: str, rows: slice = slice(None)) -> np.ndarray:
    """The tensor, or a contiguous range of its rows (axis 0)."""
    e = self.entries[name]
    start, stop, _ = rows.indices(e.shape[0]) if e.shape else (0, 1, 1)
    row_items = math.prod(e.shape[1:])
    count = (stop - start) * row_items
    with untrusted.open_regular(e.file) as f:
      f.seek(e.begin + start * row_items * e.dtype.itemsize)
      out = np.fromfile(f, dtype=e.dtype, count=count)
    if out.size != count:
      raise ValueError(f'{e.file}: tensor {name} is truncated (the file changed after it was opened?)')
    return out.reshape((stop - start, *e.shape[1:]) if e.shape else ())


# The largest header read, as the safetensors library's own limit (its MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000


def _read_header(path: str) -> dict[str, _Entry]:
  """The tensors of a safetensors file, checked as the safetensors library checks them before any
  tensor data is read: a header of at most MAX_HEADER_BYTES, a JSON object without duplicate names,
  known dtypes, shapes of non-negative integers, and byte ranges that follow one another from 0 without
  gap or overlap, each exactly as long as its shape and dtype need, the last ending at the end of the
  file. So no range can point into the header or past the file, and a shape cannot claim more memory
  than the file holds bytes."""
  with untrusted.open_regular(path) as f:
    size = untrusted.file_size(f)
    head = f.read(8)
    if len(head) < 8:
      raise ValueError(f'{path} is not a safetensors file ({size} bytes, shorter than its 8-byte header '
                       'length)')
    (header_len,) = struct.unpack('<Q', head)
    if header_len > MAX_HEADER_BYTES:
      raise ValueError(f'{path} is not a safetensors file that can be read: its header claims '
                       f'{header_len:,} bytes, more than the {MAX_HEADER_BYTES:,} allowed')
    if header_len > size - 8:
      raise ValueError(f'{path} is not a safetensors file (header length {header_len:,} > file size '
                       f'{size:,})')
    raw = f.read(header_len)

  twice = []

  def noting_duplicates(pairs):
    seen = {}
    for key, value in pairs:
      if key in seen:
        twice.append(key)
      seen[key] = value
    return seen
  if not raw.startswith(b'{'):
    raise ValueError(f'{path} is not a safetensors file (its header is not a JSON object)')
  header = untrusted.parse_json(raw, f'{path} (header)', object_pairs_hook=noting_duplicates)
  if twice:
    raise ValueError(f'{path}: the header names {twice[0]!r} twice')
  if not isinstance(header, dict):
    raise ValueError(f'{path} is not a safetensors file (its header is not a JSON object)')
  header.pop('__metadata__', None)
  data_start, data_size = 8 + header_len, size - 8 - header_len
  entries, ranges = {}, []
  for key, info in header.items():
    if not isinstance(info, dict):
      raise ValueError(f'{path}: tensor {key!r}: expected an object with dtype, shape and data_offsets, '
                       f'got {type(info).__name__}')
    dtype, shape, offsets = info.get('dtype'), info.get('shape'), info.get('data_offsets')
    if not isinstance(dtype, str) or dtype not in DTYPES:
      raise ValueError(f'{path}: tensor {key!r} has unsupported dtype {dtype!r} (known: '
                       f'{", ".join(DTYPES)})')
    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
      raise ValueError(f'{path}: tensor {key!r} has shape {shape!r}; expected a list of non-negative '
                       'integers')
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(type(n) is int and n >= 0 for n in offsets) and offsets[0] <= offsets[1]):
      raise ValueError(f'{path}: tensor {key!r} has data_offsets {offsets!r}; expected [begin, end] with '
                       '0 <= begin <= end')
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
      raise ValueError(f'{path}: tensor {key!r} has {offsets[1] - offsets[0]:,} bytes '
                       f'(data_offsets {offsets}), but its shape {tuple(shape)} and dtype {dtype} need '
                       f'{nbytes:,}')
    ranges.append((offsets[0], offsets[1], key))
    entries[key] = _Entry(path, DTYPES[dtype], tuple(shape), data_start + offsets[0],
                          data_start + offsets[1])
  end = 0
  for begin, stop, key in sorted(ranges):
    if begin != end:
      raise ValueError(f'{path}: tensor {key!r} starts at byte {begin:,} of the data, but the tensor '
                       f'before it ends at {end:,} (' + ('a gap' if begin > end else 'overlapping ranges')
                       + '); the tensors must fill the data one after another')
    end = stop
  if end != data_size:
    raise ValueError(f'{path}: its tensors end at byte {end:,} of the data, but the file holds {data_size:,} '
                     'bytes of data after the header (' + ('truncated' if end > data_size else
                                                            'bytes no tensor covers') + ')')
  return entries


def write_safetensors(path: str,
                      tensors: list[tuple[str, tuple[int, ...], np.dtype, Callable[[], Iterator[np.ndarray]]]]):
  """Writes `(name, shape, dtype, blocks)` tensors; `blocks()` yields the tensor's rows in order, in
  blocks of any size, and is called only when the tensor's turn comes (memory stays flat)."""
  header, offset = {'__metadata__': {'format': 'pt'}}, 0
  for name, shape, dtype, _ in tensors:
    nbytes = math.prod(shape) * dtype.itemsize
    header[name] = {'dtype': _NAMES[dtype], 'shape': list(shape), 'data_offsets': [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)  # keep the tensor data 8-byte aligned
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(struct.pack('<Q', len(blob)) + blob)
    for name, shape, dtype, blocks in tensors:
      written = 0
      for block in blocks():
        block = np.ascontiguousarray(block, dtype=dtype)
        f.write(block.reshape(-1).view(np.uint8).data)
        written += block.size
      if written != math.prod(shape):
        raise AssertionError(f'{name}: wrote {written} values, declared shape {shape}')
  os.replace(tmp, path)

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
  """The tensors of a Hugging Face model folder (`model.safetensors` or a sharded index), read lazily."""

  def __init__(self, hf_dir: str):
    if sys.byteorder != 'little':
      raise RuntimeError('safetensors are little-endian; this reader assumes a little-endian host')
    index = os.path.join(hf_dir, 'model.safetensors.index.json')
    if os.path.exists(index):
      with open(index) as f:
        files = sorted(set(json.load(f)['weight_map'].values()))
    else:
      files = sorted(f for f in os.listdir(hf_dir) if f.endswith('.safetensors'))
    if not files:
      bins = [f for f in os.listdir(hf_dir) if f.endswith(('.bin', '.pt', '.pth'))]
      hint = (f' It has PyTorch pickles ({bins[:3]}); re-save them as safetensors first, e.g. '
              '`AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR)`.' if bins else '')
      raise FileNotFoundError(f'{hf_dir}: no *.safetensors files.{hint}')
    self.entries: dict[str, _Entry] = {}
    for name in files:
      path = os.path.join(hf_dir, name)
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
    if e.end - e.begin != math.prod(e.shape) * e.dtype.itemsize:
      raise ValueError(f'{e.file}: tensor {name} has {e.end - e.begin} bytes, its shape {e.shape} needs '
                       f'{math.prod(e.shape) * e.dtype.itemsize}')
    start, stop, _ = rows.indices(e.shape[0]) if e.shape else (0, 1, 1)
    row_items = math.prod(e.shape[1:])
    count = (stop - start) * row_items
    with open(e.file, 'rb') as f:
      f.seek(e.begin + start * row_items * e.dtype.itemsize)
      out = np.fromfile(f, dtype=e.dtype, count=count)
    if out.size != count:
      raise ValueError(f'{e.file}: tensor {name} is truncated')
    return out.reshape((stop - start, *e.shape[1:]) if e.shape else ())


def _read_header(path: str) -> dict[str, _Entry]:
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    (header_len,) = struct.unpack('<Q', f.read(8))
    if header_len > size - 8:
      raise ValueError(f'{path} is not a safetensors file (header length {header_len} > file size)')
    header = json.loads(f.read(header_len))
  header.pop('__metadata__', None)
  entries = {}
  for key, info in header.items():
    if info['dtype'] not in DTYPES:
      raise ValueError(f'{path}: tensor {key} has unsupported dtype {info["dtype"]}')
    begin, end = info['data_offsets']
    entries[key] = _Entry(path, DTYPES[info['dtype']], tuple(info['shape']), 8 + header_len + begin,
                          8 + header_len + end)
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

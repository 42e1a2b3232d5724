"""A tf.data iterator yielding numpy batches, whose exact position can be saved and restored.

The position is tf.data's own iterator checkpoint (shuffle buffers, packing carry and all), packed
into bytes so that the trainer can store it inside its orbax checkpoint, one blob per host.
"""

import atexit
import io
import os
import re
import tempfile
import weakref
import zipfile

import tensorflow as tf

from data.records import BadRecord


# Iterators still alive at interpreter exit are closed first: TensorFlow aborts the process if a
# prefetch thread is inside a Python tokenization step while the interpreter tears down.
_LIVE = weakref.WeakSet()
atexit.register(lambda: [it.close() for it in list(_LIVE)])


# The one-line message of a data.records.BadRecord raised inside a tf.data step.
_PY_ERROR = re.compile(r'^\s*(?:[\w.]+\.)?BadRecord: (.+)$', re.MULTILINE)


class DatasetIterator:

  def __init__(self, dataset: tf.data.Dataset):
    options = tf.data.Options()
    # Our Python tokenization steps hold no state of their own, so skipping them when saving is exact.
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    options.deterministic = True
    self._dataset = dataset.with_options(options)
    self._iterator = iter(self._dataset)
    _LIVE.add(self)

  def close(self):
    self._iterator = None

  def __iter__(self):
    return self

  def __next__(self):
    try:
      batch = next(self._iterator)
    except tf.errors.OpError as e:
      found = _PY_ERROR.findall(e.message)
      if not found:
        raise
      raise BadRecord(found[-1]) from None
    return tf.nest.map_structure(lambda t: t.numpy(), batch)

  def get_state(self) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
      tf.train.Checkpoint(iterator=self._iterator).write(os.path.join(tmp, 'iterator'))
      buffer = io.BytesIO()
      with zipfile.ZipFile(buffer, 'w', zipfile.ZIP_STORED) as z:
        for name in sorted(os.listdir(tmp)):
          z.write(os.path.join(tmp, name), name)
    return buffer.getvalue()

  def set_state(self, state: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
      with zipfile.ZipFile(io.BytesIO(state)) as z:
        z.extractall(tmp)
      tf.train.Checkpoint(iterator=self._iterator).read(os.path.join(tmp, 'iterator')).assert_consumed()

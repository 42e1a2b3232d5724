"""SIGTERM / SIGINT become a request to stop at a step boundary that every host agrees on.

TPU VMs are preempted with SIGTERM (on every host, not all at the same instant). The handler only
records the request; the loop asks `should_stop()` after each step, and with several processes the
hosts take the logical OR of their requests (one tiny all-gather), so all of them save the same step
and exit together. A second SIGINT (Ctrl-C twice) interrupts at once.
"""

import signal
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class StopRequest:

  def __init__(self):
    self.signal_name: str | None = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.signal_name == 'SIGINT' and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal_name = name
    logging.warning('%s received: stopping after the step in flight, with a checkpoint', name)

  def should_stop(self) -> bool:
    local = self.signal_name is not None
    if jax.process_count() == 1:
      return local
    return bool(np.max(multihost_utils.process_allgather(np.int32(local))))

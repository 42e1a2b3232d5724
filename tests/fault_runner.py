"""Runs an entry point (`python tests/fault_runner.py train.pretrain --flags...`) with one fault
injected for the fault tests: if FLAXLM_HANG_COMMIT_OF_STEP=N, the final commit (the rename of the
finished temporary folder) of checkpoint step N never happens, so that a SIGKILL can land in the
middle of an asynchronous save. FLAXLM_HANG_MARKER names a file created when the hang begins.
"""

import asyncio
import os
import runpy
import sys

from orbax.checkpoint._src.path import atomicity

_STEP = os.environ.get('FLAXLM_HANG_COMMIT_OF_STEP', '')
_finalize = atomicity.AtomicRenameTemporaryPath.finalize


async def _hanging_finalize(self):
  if _STEP and os.path.basename(str(self._final_path)) == _STEP:
    with open(os.environ['FLAXLM_HANG_MARKER'], 'w', encoding='utf-8') as f:
      f.write(str(self._tmp_path))
    await asyncio.sleep(3600)
  return await _finalize(self)


atomicity.AtomicRenameTemporaryPath.finalize = _hanging_finalize

if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  module = sys.argv[1]
  sys.argv = [module] + sys.argv[2:]
  runpy.run_module(module, run_name='__main__', alter_sys=True)

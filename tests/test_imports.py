"""Every module of the project imports, all of them into one process, and `model/` and `train/` import
with TensorFlow unavailable (the GPU image has none).

Each check runs in a fresh interpreter: what it catches (two modules defining the same absl flag at
import time, a stray TensorFlow import) depends on what else is already loaded.
"""

import os
import pkgutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules(*packages: str) -> list[str]:
  names = []
  for package in packages:
    names += [f'{package}.{m.name}' for m in pkgutil.iter_modules([os.path.join(ROOT, package)])]
  return sorted(names)


def _run(code: str) -> subprocess.CompletedProcess:
  env = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300, check=False)


def test_every_module_imports_alongside_every_other():
  modules = _modules('model', 'train', 'data')
  assert {'train.pretrain', 'train.sft', 'train.benchmark', 'data.benchmark'} <= set(modules)
  result = _run('import importlib\n'
                f'for name in {modules!r}:\n'
                '  importlib.import_module(name)\n'
                'print("imported all")\n')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'imported all' in result.stdout


def test_model_and_train_import_without_tensorflow():
  modules = _modules('model', 'train')
  # A None entry in sys.modules makes `import tensorflow` raise ImportError, as where it is missing.
  result = _run('import sys, importlib\n'
                'sys.modules["tensorflow"] = None\n'
                f'for name in {modules!r}:\n'
                '  importlib.import_module(name)\n'
                'print("ok")\n')
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith('ok')

"""Every module of the project imports, all of them into one process; `model/` and `train/` import
with TensorFlow unavailable (the GPU image has none); and imports go one way (model/ never imports
train/, data/ imports neither).

Each check runs in a fresh interpreter: what it catches (two modules defining the same absl flag at
import time, a stray TensorFlow import) depends on what else is already loaded.
"""

import ast
import glob
import os
import pkgutil
import re
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


# ---------------------------------------------------------------------------------------------------
# The direction of imports, read from the code's own import statements at every nesting level.

PACKAGES = ('model', 'data', 'train', 'configs')
# Which project packages each package may import: data/ is the bottom layer, model/ stands alone (its
# command-line modules may use data/ for tokenizers and templates), train/ builds on both, configs/
# describe runs (model presets, the data section).
MAY_IMPORT = {'data': {'data'}, 'model': {'model', 'data'}, 'train': {'train', 'model', 'data'},
              'configs': {'configs', 'model', 'data'}}


def _imports(tree):
  """(project package, line, at module top level) for every import statement in a module."""
  top = set(map(id, tree.body))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = [node.module]
    else:
      continue
    for name in names:
      package = name.split('.')[0]
      if package in PACKAGES:
        yield package, node.lineno, id(node) in top


def _is_command(tree) -> bool:
  """Has an `if __name__ == '__main__':` block."""
  return any(isinstance(n, ast.If) and isinstance(n.test, ast.Compare)
             and isinstance(n.test.left, ast.Name) and n.test.left.id == '__name__' for n in tree.body)


def import_violations(root: str) -> list[str]:
  errors = []
  for package in PACKAGES:
    for path in sorted(glob.glob(os.path.join(root, package, '*.py'))):
      name = f'{package}/{os.path.basename(path)}'
      with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), path)
      command = _is_command(tree)
      for imported, line, at_top in _imports(tree):
        where = f'{name}:{line} imports {imported}/'
        if imported not in MAY_IMPORT[package]:
          errors.append(f'{where}, which {package}/ must not import')
        elif package == 'model' and imported == 'data' and not command:
          errors.append(f'{where}: only model/ command-line modules may use data/')
        elif package == 'model' and imported == 'data' and not at_top:
          errors.append(f'{where} inside a function: import it at the top of the file')
  return errors


def test_imports_go_one_way():
  assert import_violations(ROOT) == []


def test_a_hidden_import_is_caught(tmp_path):
  for package in PACKAGES:
    (tmp_path / package).mkdir()
  (tmp_path / 'model' / 'lib.py').write_text(
      'import jax\n\ndef load():\n  if True:\n    from train import checkpoint\n')
  (tmp_path / 'model' / 'tool.py').write_text(
      'from data import chat\n\ndef main():\n  from data import tokenizer\n\n'
      "if __name__ == '__main__':\n  main()\n")
  (tmp_path / 'model' / 'net.py').write_text('from data.tokenizer import load_tokenizer\n')
  (tmp_path / 'data' / 'pipe.py').write_text('class A:\n  def f(self):\n    import model.config\n')
  (tmp_path / 'configs' / 'c.py').write_text('from train import loop\n')
  assert import_violations(str(tmp_path)) == [
      'model/lib.py:5 imports train/, which model/ must not import',
      'model/net.py:1 imports data/: only model/ command-line modules may use data/',
      'model/tool.py:4 imports data/ inside a function: import it at the top of the file',
      'data/pipe.py:3 imports model/, which data/ must not import',
      'configs/c.py:1 imports train/, which configs/ must not import',
  ]


def _requirement_names(path: str) -> set[str]:
  names = set()
  with open(os.path.join(ROOT, path), encoding='utf-8') as f:
    for line in f:
      requirement = line.split('#')[0].strip()
      if requirement:
        names.add(re.split(r'[\s<>=!~;\[]', requirement, maxsplit=1)[0].lower())
  return names


def test_the_newest_set_installs_every_runtime_package_of_the_pinned_one():
  # A package added to requirements.txt alone breaks only the Python 3.12 run, the second CI runs.
  missing = _requirement_names('requirements.txt') - _requirement_names('requirements-newest.txt')
  assert not missing, f'requirements-newest.txt lacks {sorted(missing)} (listed in requirements.txt)'

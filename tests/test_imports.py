"""Every module of the project imports, all of them into one process; `model/` and `train/` import
with TensorFlow unavailable (the GPU image has none); and imports go one way, floor by floor (runtime/
at the bottom, then data/ and the network, weights on disk, inference, evaluation, model/'s commands,
train/).

Each check runs in a fresh interpreter: what it catches (two modules defining the same absl flag at
import time, a stray TensorFlow import) depends on what else is already loaded.
"""

import ast
import glob
import os
import pkgutil
import re
import subprocess

import pytest

from tests.cli import ROOT, run_python

pytestmark = pytest.mark.unit


def _modules(*packages: str) -> list[str]:
  names = []
  for package in packages:
    prefix = package.replace('/', '.')
    names += [f'{prefix}.{m.name}' for m in pkgutil.iter_modules([os.path.join(ROOT, package)])
              if not m.ispkg]
  return sorted(names)


def _run(code: str) -> subprocess.CompletedProcess:
  return run_python('-c', code)


@pytest.mark.e2e
def test_every_module_imports_alongside_every_other():
  modules = _modules('runtime', 'model', 'model/weights', 'model/inference', 'model/evaluation', 'train',
                     'data')
  assert {'train.pretrain', 'train.sft', 'train.benchmark', 'data.benchmark'} <= set(modules)
  result = _run('import importlib\n'
                f'for name in {modules!r}:\n'
                '  importlib.import_module(name)\n'
                'print("imported all")\n')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'imported all' in result.stdout


@pytest.mark.e2e
def test_model_and_train_import_without_tensorflow():
  modules = _modules('runtime', 'model', 'model/weights', 'model/inference', 'train')
  # A None entry in sys.modules makes `import tensorflow` raise ImportError, as where it is missing.
  result = _run('import sys, importlib\n'
                'sys.modules["tensorflow"] = None\n'
                f'for name in {modules!r}:\n'
                '  importlib.import_module(name)\n'
                'print("ok")\n')
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith('ok')


# ---------------------------------------------------------------------------------------------------
# The floors, and the direction of imports between them, read from the code's own import statements
# at every nesting level. A module's floor is its folder: `model/weights/params.py` is on
# `model.weights`; a command-line module (one with an `if __name__ == '__main__':` block) of `model/`
# stands on the floor `model.commands` instead of the network's.

PACKAGES = ('runtime', 'data', 'model', 'train', 'configs')
# Which floors each floor may import. runtime/ (what every process does first and last) is the lowest,
# so that data/'s commands end as every other does; data/ stands on it alone; the network (model/'s
# own modules) imports nothing else of the project; weights on disk and inference each stand on the
# network; evaluation on inference; the commands of model/ on all of these and data/ (tokenizers,
# chat templates); train/ on everything; configs/ describe runs (model presets, the data section, the
# run spec's sections).
NETWORK = 'model'
MAY_IMPORT = {
    'runtime': {'runtime'},
    'data': {'data', 'runtime'},
    NETWORK: {NETWORK},
    'model.weights': {NETWORK, 'model.weights'},
    'model.inference': {NETWORK, 'model.inference'},
    'model.evaluation': {NETWORK, 'model.inference', 'model.evaluation'},
    'model.commands': {NETWORK, 'model.weights', 'model.inference', 'model.evaluation',
                       'model.commands', 'data', 'runtime'},
    'train': {'train', NETWORK, 'model.weights', 'model.inference', 'model.evaluation',
              'model.commands', 'data', 'runtime'},
    'configs': {'configs', NETWORK, 'data', 'train.spec'},
}
MAY_IMPORT['train'].add('train.spec')
SUBFLOORS = ('model.weights', 'model.inference', 'model.evaluation')
# The run spec (the sections a config converts into) is what configs/ describe: they may import it alone
# of train/.
SPEC = 'train.spec'
COMMANDS = ('model.generate', 'model.convert', 'model.evaluate')


def floor_of_module(name: str) -> str:
  """The floor of an imported module (`model.weights.params` -> 'model.weights')."""
  if name in COMMANDS or any(name.startswith(c + '.') for c in COMMANDS):
    return 'model.commands'
  if name == SPEC:
    return SPEC
  for sub in SUBFLOORS:
    if name == sub or name.startswith(sub + '.'):
      return sub
  return name.split('.')[0]


def _imports(tree):
  """(imported floor, line) for every import statement of a project module in a module."""
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      # `from model import weights` imports the floor model.weights.
      names = [f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in SUBFLOORS + COMMANDS + (SPEC,)
               else node.module for a in node.names]
    else:
      continue
    for name in names:
      if name.split('.')[0] in PACKAGES:
        yield floor_of_module(name), node.lineno


def _is_command(tree) -> bool:
  """Has an `if __name__ == '__main__':` block."""
  return any(isinstance(n, ast.If) and isinstance(n.test, ast.Compare)
             and isinstance(n.test.left, ast.Name) and n.test.left.id == '__name__' for n in tree.body)


def _floor_of_file(root: str, path: str, tree) -> str:
  folder = os.path.relpath(os.path.dirname(path), root).replace(os.sep, '.')
  if folder == NETWORK and _is_command(tree):
    return 'model.commands'
  return folder if folder.startswith(NETWORK + '.') else folder.split('.')[0]


def import_violations(root: str) -> list[str]:
  errors = []
  for package in PACKAGES:
    for path in sorted(glob.glob(os.path.join(root, package, '**', '*.py'), recursive=True)):
      name = os.path.relpath(path, root).replace(os.sep, '/')
      with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), path)
      floor = _floor_of_file(root, path, tree)
      if floor not in MAY_IMPORT:
        errors.append(f'{name}: {floor} is no floor (add it to MAY_IMPORT)')
        continue
      for imported, line in _imports(tree):
        if imported not in MAY_IMPORT[floor]:
          errors.append(f'{name}:{line} imports {imported}, which {floor} must not import')
  return errors


def test_imports_go_one_way():
  assert import_violations(ROOT) == []


def test_a_hidden_import_is_caught(tmp_path):
  for folder in ('runtime', 'data', 'model/weights', 'model/inference', 'model/evaluation', 'train',
                 'configs'):
    (tmp_path / folder).mkdir(parents=True)
  (tmp_path / 'model' / 'lib.py').write_text(
      'import jax\n\ndef load():\n  if True:\n    from train import checkpoint\n')
  (tmp_path / 'model' / 'net.py').write_text('from data.tokenizer import load_tokenizer\n')
  (tmp_path / 'model' / 'deep.py').write_text('def f():\n  from model.weights import params\n')
  (tmp_path / 'model' / 'tool.py').write_text(
      'from data import chat\nfrom model.inference import sampler\n\ndef main():\n'
      '  from data import tokenizer\n\nif __name__ == \'__main__\':\n  main()\n')
  (tmp_path / 'model' / 'weights' / 'w.py').write_text('import runtime\n')
  (tmp_path / 'model' / 'inference' / 's.py').write_text('from model import weights\n')
  (tmp_path / 'model' / 'evaluation' / 'e.py').write_text('from model.generate import load_model\n')
  (tmp_path / 'data' / 'pipe.py').write_text('import runtime\nclass A:\n  def f(self):\n'
                                            '    import model.config\n')
  (tmp_path / 'runtime' / 'r.py').write_text('from data import records\n')
  (tmp_path / 'configs' / 'c.py').write_text('from train import loop\n')
  assert import_violations(str(tmp_path)) == [
      'runtime/r.py:1 imports data, which runtime must not import',
      'data/pipe.py:4 imports model, which data must not import',
      'model/deep.py:2 imports model.weights, which model must not import',
      'model/evaluation/e.py:1 imports model.commands, which model.evaluation must not import',
      'model/inference/s.py:1 imports model.weights, which model.inference must not import',
      'model/lib.py:5 imports train, which model must not import',
      'model/net.py:1 imports data, which model must not import',
      'model/weights/w.py:1 imports runtime, which model.weights must not import',
      'configs/c.py:1 imports train, which configs must not import',
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

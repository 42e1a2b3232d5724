"""Every test module declares its tier in a module-level `pytestmark`, so that `bash scripts/test.sh
quick` (-m "unit and not slow"), `-m e2e` and `-m parity` select what they say, and a new module
cannot be forgotten."""

import ast
import glob
import os

import pytest

from tests.cli import ROOT

pytestmark = pytest.mark.unit


def declared_marks(config) -> dict[str, str]:
  """pytest.ini's own markers (not those of pytest and its plugins): name -> what it means."""
  import configparser  # pylint: disable=import-outside-toplevel
  ini = configparser.ConfigParser()
  ini.read(config.inipath)
  ours = {line.split(':', 1)[0].strip() for line in ini['pytest']['markers'].strip().splitlines()}
  return {name: meaning for name, meaning in (
      (part.strip() for part in line.split(':', 1)) for line in config.getini('markers')) if name in ours}


def module_marks(source: str) -> set[str]:
  """The names of the marks in a module's top-level `pytestmark = ...` (one mark or a list)."""
  for node in ast.parse(source).body:
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, 'target', None)]
    if any(isinstance(t, ast.Name) and t.id == 'pytestmark' for t in targets):
      return {n.attr for n in ast.walk(node.value)
              if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute) and n.value.attr == 'mark'}
  return set()


def missing_tiers(root: str, marks: dict[str, str]) -> list[str]:
  """What to add to each test module under root/tests that declares no tier: a message per module."""
  tiers = [name for name in marks if name != 'slow']
  meanings = '; '.join(f'{name}: {meaning}' for name, meaning in marks.items())
  problems = []
  for path in sorted(glob.glob(os.path.join(root, 'tests', 'test_*.py'))):
    with open(path, encoding='utf-8') as f:
      declared = module_marks(f.read())
    name = os.path.relpath(path, root)
    if not declared & set(tiers):
      unknown = f' (it has {sorted(declared)})' if declared else ''
      problems.append(
          f'{name} declares no tier{unknown}. Add below its imports the one its tests are:\n'
          f'    pytestmark = pytest.mark.unit\n'
          f'or pytest.mark.e2e or pytest.mark.parity, a list for several (e.g. [pytest.mark.e2e, '
          f'pytest.mark.slow]); a test of another tier than its module gets its own @pytest.mark.<tier>. '
          f'The marks ({meanings}) are declared in pytest.ini.')
  return problems


def test_every_test_module_declares_a_tier(pytestconfig):
  marks = declared_marks(pytestconfig)
  assert {'unit', 'e2e', 'parity', 'slow'} <= set(marks)
  problems = missing_tiers(ROOT, marks)
  assert not problems, '\n\n'.join(problems)


def test_a_module_without_a_tier_is_named_with_what_to_add(pytestconfig, tmp_path):
  (tmp_path / 'tests').mkdir()
  (tmp_path / 'tests' / 'test_new.py').write_text('import pytest\n\n\ndef test_x():\n  pass\n')
  (tmp_path / 'tests' / 'test_slow_only.py').write_text('import pytest\n\npytestmark = pytest.mark.slow\n')
  (tmp_path / 'tests' / 'test_fine.py').write_text(
      'import pytest\n\npytestmark = [pytest.mark.e2e, pytest.mark.slow]\n')
  problems = missing_tiers(str(tmp_path), declared_marks(pytestconfig))
  assert len(problems) == 2
  assert problems[0].startswith('tests/test_new.py declares no tier. Add below its imports')
  assert '\n    pytestmark = pytest.mark.unit\n' in problems[0]
  assert 'e2e: runs an entry point' in problems[0]
  assert problems[1].startswith("tests/test_slow_only.py declares no tier (it has ['slow'])")

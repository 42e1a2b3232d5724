"""Every `python -m <our module> ...` command in the docs is one the project accepts.

Commands are collected from README.md and docs/*.md (fenced shell blocks and inline code spans) and
from notebooks/*.ipynb (markdown cells, and the string given to `sh(...)` in code cells). Each is then
parsed by the entry point's own flags, in a subprocess per module.


Every entry point uses absl flags: the module runs as `__main__` with `app.run` stopped, so its flags
are defined exactly as on the command line, and absl parses the command: unknown flags, values of the
wrong type, missing required flags, a config file that does not load (with its `:options`), and
`--config.a.b=value` overrides of keys that `get_config()` does not have are all errors. A command
with subcommands (model.convert) has its subcommand and the flags it needs checked by the same
function its main calls (runtime/__init__.py `parse_command`).

Placeholders are fine where a value is meant to be filled in: `$VAR`, `{var}`, `<thing>`, `...` and
ALL-CAPS words (DIR, CKPT, N, HOST:PORT). For a flag whose value must be a number or one of some
choices, a placeholder is replaced by the flag's default before parsing; a `--config.a.b=N` override
with a placeholder must still name a real key. Flag names are never placeholders.
"""

import ast
import glob
import json
import os
import re
import shlex
import sys
from concurrent import futures
from dataclasses import dataclass

import pytest

from tests.cli import ROOT, run_python

pytestmark = pytest.mark.unit

PACKAGES = ('configs', 'data', 'model', 'train')  # modules of these packages are the project's
SHELL_LANGS = {'', 'bash', 'sh', 'shell', 'console', 'zsh', 'text'}
PLACEHOLDER = re.compile(r'\$|\{.*\}|<[^>]*>|\.\.\.|^[A-Z][A-Z0-9_]*(:[A-Z][A-Z0-9_]*)*$')
OPERATORS = set('();<>|&')


@dataclass
class Command:
  source: str   # file:line
  module: str
  args: list
  text: str
  complete: bool = True  # False for inline code spans in prose, which may leave out required flags

  def __str__(self):
    return f'{self.source}: python -m {self.module} {" ".join(self.args)}'


# ---------------------------------------------------------------------------------------------------
# Finding the commands

def _tokens(text: str) -> list[str]:
  lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  lexer.commenters = '#'
  try:
    return list(lexer)
  except ValueError:  # an unclosed quote: fall back to plain splitting
    return text.split()


def _quotes_closed(text: str) -> bool:
  try:
    shlex.split(text, comments=True)
    return True
  except ValueError:
    return False


def _is_python(token: str) -> bool:
  name = os.path.basename(token.strip('"\''))
  return bool(re.fullmatch(r'python(3(\.\d+)?)?', name)) or token in ('$PY', '${PY}', '{PY}',
                                                                      '{sys.executable}')


def commands_in_line(text: str, source: str, complete: bool = True) -> list[Command]:
  """The `python -m <project module> ...` commands in one logical shell line, including those
  inside quoted arguments (e.g. `gcloud ... --command="python -m train.pretrain ..."`)."""
  found = []
  tokens = _tokens(re.sub(r'<([\w -]+)>', r'{\1}', text))  # <model> -> {model}: a placeholder
  for i, token in enumerate(tokens):
    if ' ' in token and 'python' in token:
      found += commands_in_line(token, source, complete)
      continue
    if _is_python(token) and i + 2 < len(tokens) and tokens[i + 1] == '-m':
      module = tokens[i + 2]
      if module.split('.')[0] not in PACKAGES:
        continue  # pip, venv, pytest, ...
      args, more = [], False
      for arg in tokens[i + 3:]:
        if set(arg) <= OPERATORS:
          break
        # A lone {expr} is a flag's value after `--flag`, else it stands for more arguments (which
        # may hold the required flags).
        if re.fullmatch(r'\{\w*\}', arg) and not (args and args[-1].startswith('-') and '=' not in args[-1]):
          more = True
          continue
        args.append(arg)
      found.append(Command(source, module, args, text, complete and not more))
  return found


def _logical_line(lines: list[str], i: int, fence: str) -> tuple[str, int]:
  """The command starting at lines[i] and the index of its last line: it goes on while a line ends
  in a backslash or a quote is still open, up to the end of the code block. A quote that never
  closes (an apostrophe in a diagram) does not join lines."""
  def join(quotes: bool):
    text, j = re.sub(r'^\$ ', '', lines[i].strip()), i
    while j + 1 < len(lines) and not lines[j + 1].strip().startswith(fence) and (
        text.endswith('\\') or (quotes and not _quotes_closed(text))):
      j += 1
      text = (text[:-1] if text.endswith('\\') else text) + ' ' + lines[j].strip()
    return text, j
  text, j = join(quotes=True)
  return (text, j) if _quotes_closed(text) else join(quotes=False)


def commands_in_markdown(text: str, name: str) -> list[Command]:
  found = []
  lines = text.split('\n')
  fence, lang, i = None, '', 0
  while i < len(lines):
    line, number = lines[i], i + 1
    stripped = line.strip()
    match = re.match(r'^(```+|~~~+)\s*([\w+-]*)', stripped)
    if fence is None and match:
      fence, lang = match.group(1), match.group(2).lower()
      i += 1
      continue
    if fence is not None and stripped.startswith(fence):
      fence = None
      i += 1
      continue
    if fence is not None:
      if lang not in SHELL_LANGS:
        i += 1
        continue
      logical = re.sub(r'^\$ ', '', stripped)
      logical, i = _logical_line(lines, i, fence)
      found += commands_in_line(logical, f'{name}:{number}')
    else:
      for span in re.findall(r'`([^`]+)`', line):
        if re.search(r'python\S*\s+-m\s', span):
          # Inline spans in prose may show optional parts in [brackets].
          found += commands_in_line(span.replace('[', ' ').replace(']', ' '), f'{name}:{number}',
                                    complete=False)
    i += 1
  return found


def _string_with_placeholders(node) -> str | None:
  """The text of a str literal or f-string, with `{expr}` for each formatted value."""
  if isinstance(node, ast.Constant) and isinstance(node.value, str):
    return node.value
  if isinstance(node, ast.JoinedStr):
    return ''.join(v.value if isinstance(v, ast.Constant) else _placeholder(v.value)
                   for v in node.values)
  if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
    left, right = _string_with_placeholders(node.left), _string_with_placeholders(node.right)
    if left is None and right is None:
      return None
    return (left if left is not None else f' {_placeholder(node.left)} ') + (
        right if right is not None else f' {_placeholder(node.right)}')
  return None


def _placeholder(node) -> str:
  """A Python expression inside a command string -> one shell word, `{like_this}`."""
  return '{' + re.sub(r'\W+', '_', ast.unparse(node)).strip('_') + '}'


def commands_in_notebook(path: str, name: str) -> list[Command]:
  with open(path, encoding='utf-8') as f:
    notebook = json.load(f)
  found = []
  for index, cell in enumerate(notebook['cells']):
    source = ''.join(cell['source'])
    where = f'{name} cell {index}'
    if cell['cell_type'] == 'markdown':
      found += commands_in_markdown(source, where)
    elif cell['cell_type'] == 'code':
      try:
        tree = ast.parse(source)
      except SyntaxError:
        continue  # IPython magics; tests/test_notebook.py runs these cells
      for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == 'sh'
            and node.args):
          text = _string_with_placeholders(node.args[0])
          if text is not None:
            found += commands_in_line(' '.join(text.split()), f'{where} line {node.lineno}')
  return found


def documented_commands() -> list[Command]:
  found = []
  for path in [os.path.join(ROOT, 'README.md')] + sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md'))):
    if os.path.exists(path):
      with open(path, encoding='utf-8') as f:
        found += commands_in_markdown(f.read(), os.path.relpath(path, ROOT))
  for path in sorted(glob.glob(os.path.join(ROOT, 'notebooks', '*.ipynb'))):
    found += commands_in_notebook(path, os.path.relpath(path, ROOT))
  return found


# ---------------------------------------------------------------------------------------------------
# Checking them (one subprocess per module: absl flags are process-global)

def check(commands: list[Command]) -> list[str]:
  """Error messages, one per command the project would not accept."""
  by_module: dict[str, list[Command]] = {}
  for c in commands:
    by_module.setdefault(c.module, []).append(c)

  def run(module):
    cmds = by_module[module]
    proc = run_python(os.path.abspath(__file__), module, TF_CPP_MIN_LOG_LEVEL='3',
                      input=json.dumps([(c.args, c.complete) for c in cmds]))
    try:
      results = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
      return [f'{c}\n    checker crashed: {proc.stderr[-2000:]}' for c in cmds]
    return [f'{c}\n    {r}' for c, r in zip(cmds, results) if r]

  with futures.ThreadPoolExecutor(2) as pool:
    return [e for errors in pool.map(run, sorted(by_module)) for e in errors]


def _is_placeholder(value: str) -> bool:
  return bool(PLACEHOLDER.search(value))


def _split(arg: str):
  """'--name=value' -> ('name', 'value'); '--name' -> ('name', None); else (None, None)."""
  if not arg.startswith('-') or arg in ('-', '--'):
    return None, None
  name, eq, value = arg.lstrip('-').partition('=')
  return name, (value if eq else None)


def _check_absl(module: str, commands: list[list[str]], flag_values, subcommands=None,
                default_command=None) -> list[str]:
  import runtime  # pylint: disable=import-outside-toplevel
  base = set(flag_values)
  results = []
  for args, complete in commands:
    for name in set(flag_values) - base:  # config override flags registered by the previous parse
      delattr(flag_values, name)
    flag_values.unparse_flags()
    argv, deferred, error = [module], [], ''
    args = list(args)
    for i, arg in enumerate(args):  # `--flag value` -> `--flag=value` for flags that take a value
      if arg is None:
        continue
      name, value = _split(arg)
      if (name in flag_values and value is None and i + 1 < len(args)
          and flag_values[name].flag_type() != 'bool' and not args[i + 1].startswith('-')):
        args[i], args[i + 1] = f'--{name}={args[i + 1]}', None
    for arg in filter(None, args):
      name, value = _split(arg)
      if name and value is not None and _is_placeholder(value):
        if name.startswith('config.'):
          deferred.append(name)
          continue
        if name == 'config':
          arg = '--config=configs/default.py'  # every config starts from it: same keys
        if name in flag_values and flag_values[name].flag_type() != 'string':
          arg = flag_values[name].serialize() or arg
      argv.append(arg)
    try:
      sys.argv = argv  # config_flags reads its overrides from sys.argv
      rest = flag_values(argv)
      if 'config' in flag_values and flag_values['config'].present:
        flag_values['config'].value.keys()  # config files load lazily: load this one now
      if subcommands is not None:
        runtime.parse_command(rest, subcommands, default_command)
      elif len(rest) > 1 and module != 'train.plot':  # train.plot: --workdir A B lists two workdirs
        error = f'unexpected positional arguments {rest[1:]}'
      for name in deferred:
        node = flag_values['config'].value
        for key in name.split('.')[1:]:
          node = node[key]  # KeyError names the missing key
    except Exception as e:  # pylint: disable=broad-except  (whatever the entry point would hit)
      error = f'{type(e).__name__}: {e}'.split('\n')[0][:500]
      if not complete and ('must have a value other than None' in error or ' needs --' in error):
        error = ''  # a mention in prose need not name the required flags
    results.append(error)
  return results


class _Captured(Exception):
  pass


def _checker_main(module: str):
  """In a subprocess: parse each command (a JSON list of argument lists on stdin) with `module`'s own
  flags; print a JSON list of error messages ('' where accepted)."""
  import importlib  # pylint: disable=import-outside-toplevel
  import runpy  # pylint: disable=import-outside-toplevel
  commands = json.loads(sys.stdin.read())
  sys.path.insert(0, ROOT)
  from absl import app, flags  # pylint: disable=import-outside-toplevel

  def stop_app_run(*_, **__):
    raise _Captured('absl')

  app.run = stop_app_run
  try:
    runpy.run_module(module, run_name='__main__', alter_sys=True)
  except _Captured:
    pass
  except (ImportError, SystemExit, Exception) as e:  # pylint: disable=broad-except
    print(json.dumps([f'python -m {module} fails: {type(e).__name__}: {e}'] * len(commands)))
    return
  else:
    print(json.dumps([f'python -m {module} parses no command line (absl app.run)'] * len(commands)))
    return
  # A command with subcommands names each and the flags it needs (model/runtime.parse_command), and
  # maybe the one that runs without a name.
  main = importlib.import_module(module)
  print(json.dumps(_check_absl(module, commands, flags.FLAGS, getattr(main, 'COMMANDS', None),
                               getattr(main, 'DEFAULT_COMMAND', None))))


# ---------------------------------------------------------------------------------------------------
# Tests

BAD = [  # (module, args, what the error must mention): the checker must refuse each
    ('train.pretrain', ['--config=configs/tiny.py', '--workdir=DIR', '--config.train.stepz=3'], 'stepz'),
    ('train.pretrain', ['--config=configs/tiny.py', '--workdir=DIR', '--config.train.steps=many'],
     'steps'),
    ('train.pretrain', ['--config=configs/tiny.py', '--workdir=DIR', '--config.optimiser.lr=$LR'],
     'optimiser'),
    ('train.pretrain', ['--config=configs/tiny.py'], 'workdir'),
    ('train.pretrain', ['--config=configs/no_such_config.py', '--workdir=DIR'], 'no_such_config'),
    ('train.sft', ['--config=configs/sft_tiny.py', '--workdir=DIR', '--steps=3'], 'steps'),
    ('train.compile', ['--config=configs/llama2_7b.py:v9-8', '--topology=v5p-8'], 'v9-8'),
    ('data.tokenizer', ['--input=x.txt', '--out=t.model', '--vocab-size=100'], 'vocab-size'),
    ('model.generate', ['--ckpt', 'CKPT', '--tokenizer', 'T', '--prompt', 'hi', '--max-tokens', '8'],
     'max-tokens'),
    ('model.convert', ['import', '--ckpt', 'CKPT', '--out', 'OUT'], 'hf_dir'),
    ('model.convert', ['merge', '--ckpt', 'CKPT', '--out', 'OUT'], 'merge'),
    ('model.evaluate', ['--ckpt', 'CKPT', '--tokenizer', 'T', '--include_path', 'DIR'], 'tasks'),
    ('model.evaluate', ['generate-metrics', '--ckpt', 'CKPT', '--tokenizer', 'T'], 'data'),
    ('model.evaluate', ['--ckpt', 'CKPT', '--tokenizer', 'T', '--tasks', 'T', '--limits', '4'], 'limits'),
    ('train.plot', ['--workdir', 'DIR', '--output', 'x.png'], 'output'),
    ('train.no_such_module', ['--workdir=DIR'], 'no_such_module'),
]
GOOD = [  # placeholders where values go: accepted
    ('train.pretrain', ['--config=configs/tiny.py', '--workdir=gs://BUCKET/runs/x',
                        '--config.train.steps=$STEPS', '--config.distributed.num_processes=N',
                        '--config.data.train_files=gs://BUCKET/data/*.jsonl']),
    ('model.generate', ['--ckpt', 'CKPT', '--tokenizer', 'DIR', '--prompt', 'hi', '--max-new-tokens',
                        'N']),
]


def test_extraction_finds_commands_in_blocks_spans_continuations_and_quotes():
  text = '\n'.join([
      'Run `python -m train.plot --workdir DIR [--out loss.png]` afterwards.',
      '```bash',
      'python -m train.pretrain --config=configs/tiny.py \\',
      '    --workdir=runs/x  # a comment',
      'gcloud compute tpus tpu-vm ssh NAME --worker=all \\',
      '  --command="cd flaxlm && python3 -m train.sft --config=configs/sft_tiny.py --workdir=W" | tee log',
      'python -m pip install tqdm',
      '```',
      '```python',
      'subprocess.run("python -m train.nothing")',
      '```',
  ])
  found = commands_in_markdown(text, 'x.md')
  assert [(c.module, c.args, c.source) for c in found] == [
      ('train.plot', ['--workdir', 'DIR', '--out', 'loss.png'], 'x.md:1'),
      ('train.pretrain', ['--config=configs/tiny.py', '--workdir=runs/x'], 'x.md:3'),
      ('train.sft', ['--config=configs/sft_tiny.py', '--workdir=W'], 'x.md:5'),
  ]


def test_extraction_from_notebook_code_cells(tmp_path):
  cells = [
      {'cell_type': 'code', 'source': ["sh(f'python -m model.generate --ckpt {WORK}/sft --tokenizer {TOK} '\n",
                                       "   + ' '.join(f'--prompt {p}' for p in PROMPTS))"]},
      {'cell_type': 'code', 'source': ["sh('python -m train.pretrain --config=configs/tiny.py '\n",
                                       "   f'--workdir={WORK} {SHORT}')\n", "%time 1"]},  # a magic
      {'cell_type': 'markdown', 'source': ['Then `python -m train.plot --workdir DIR`.']},
  ]
  path = tmp_path / 'n.ipynb'
  path.write_text(json.dumps({'cells': cells}))
  found = commands_in_notebook(str(path), 'n.ipynb')
  assert [(c.module, c.args, c.complete) for c in found] == [
      ('model.generate', ['--ckpt', '{WORK}/sft', '--tokenizer', '{TOK}'], False),
      ('train.plot', ['--workdir', 'DIR'], False),
  ]  # the cell with a magic is not Python: test_notebook.py runs it instead


@pytest.mark.e2e
def test_documented_commands_are_accepted_and_bad_ones_are_not():
  documented = documented_commands()
  modules = {c.module for c in documented}
  # The guides exist and show the main entry points (so an extraction bug cannot pass silently).
  for doc in ('docs/tpu.md', 'docs/gpu.md', 'notebooks/quickstart.ipynb'):
    assert any(c.source.startswith(doc) for c in documented), f'no commands found in {doc}'
  assert {'train.pretrain', 'train.sft', 'train.compile', 'model.generate', 'train.plot'} <= modules
  bad = [Command(f'BAD[{i}]', m, a, '') for i, (m, a, _) in enumerate(BAD)]
  good = [Command(f'GOOD[{i}]', m, a, '') for i, (m, a) in enumerate(GOOD)]
  errors = check(documented + bad + good)
  refused = {e.split(':')[0] for e in errors if e.startswith('BAD[')}
  missed = [f'BAD[{i}] {m} {a}' for i, (m, a, _) in enumerate(BAD) if f'BAD[{i}]' not in refused]
  assert not missed, 'the checker accepted commands it must refuse:\n' + '\n'.join(missed)
  for i, (_, _, mention) in enumerate(BAD):
    message = next(e for e in errors if e.startswith(f'BAD[{i}]:'))
    assert mention in message, message
  wrong = [e for e in errors if not e.startswith('BAD[')]
  assert not wrong, f'{len(wrong)} documented command(s) the project does not accept:\n' + '\n'.join(wrong)


if __name__ == '__main__':
  _checker_main(sys.argv[1])

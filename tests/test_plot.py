"""train.plot: reads metrics.jsonl and eval_results.json of one or more workdirs into a PNG, without
TensorFlow or JAX, and keeps the later values of steps that a resumed run logged twice."""

import json
import os

import pytest

from tests.cli import run_cli, run_python
from train import plot

pytestmark = pytest.mark.unit


def _write_run(workdir, records, evals=None):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w', encoding='utf-8') as f:
    for r in records:
      f.write(r if isinstance(r, str) else json.dumps({'time': 0.0, **r}) + '\n')
  if evals is not None:
    with open(os.path.join(workdir, 'eval_results.json'), 'w', encoding='utf-8') as f:
      json.dump(evals, f)


def _train(step, loss, tokens_per_sec=None):
  r = {'step': step, 'loss': loss, 'learning_rate': 1e-3 * step, 'grad_norm': 1.0 / step}
  if tokens_per_sec:
    r['tokens_per_sec'] = tokens_per_sec
  return r


@pytest.fixture
def resumed_run(tmp_path):
  """Logged steps 10..40, was killed, resumed from its step-20 checkpoint and redid 30 and 40,
  leaving a line cut short by the kill."""
  workdir = str(tmp_path / 'resumed')
  _write_run(workdir, [
      {'step': 0, 'eval_loss': 8.0},
      _train(10, 7.0),
      _train(20, 6.0, 1000.0), {'step': 20, 'eval_loss': 6.5},
      _train(30, 5.0, 1100.0),
      _train(40, 4.9, 1200.0),
      '{"step": 50, "loss": 4.',  # cut short by SIGKILL: the resumed run's first line continues it
      _train(30, 5.5, 900.0),     # the resumed run redoes 30 and 40 (other data order, other loss)
      _train(40, 5.25, 950.0), {'step': 40, 'eval_loss': 5.75},
  ], evals=[{'step': 0, 'eval_loss': 8.0}, {'step': 20, 'eval_loss': 6.5},
            {'step': 40, 'eval_loss': 5.75}])
  return workdir


def test_resumed_steps_keep_the_later_values(resumed_run, capsys):
  run = plot.load_run(resumed_run)
  assert run['series']['loss'] == ([10, 20, 30, 40], [7.0, 6.0, 5.5, 5.25])
  assert run['series']['tokens_per_sec'] == ([20, 30, 40], [1000.0, 900.0, 950.0])
  assert run['eval'] == ([0, 20, 40], [8.0, 6.5, 5.75])
  assert '1 line(s) of' in capsys.readouterr().err
  line = plot.summary(run)
  assert 'step 40' in line and 'train loss 5.2500' in line and 'median 950 tokens/s' in line
  assert 'held-out loss 8.0000 (step 0) -> 5.7500 (step 40), best 5.7500 at step 40' in line


def test_eval_loss_comes_from_metrics_when_there_is_no_eval_results(tmp_path):
  workdir = str(tmp_path / 'run')
  _write_run(workdir, [{'step': 0, 'eval_loss': 3.0}, _train(5, 2.0), {'step': 5, 'eval_loss': 2.5}])
  assert plot.load_run(workdir)['eval'] == ([0, 5], [3.0, 2.5])


def test_figure_has_one_line_per_run_and_curve(resumed_run, tmp_path):
  other = str(tmp_path / 'other')
  _write_run(other, [_train(10, 3.0, 500.0), _train(20, 2.0, 600.0)])  # no evaluations
  fig, runs = plot.plot_runs([resumed_run, other], labels=['a', 'b'])
  loss, throughput, lr, grad_norm = fig.axes
  assert [l.get_label() for l in loss.get_lines()] == ['a train', 'a held-out', 'b train']
  assert list(loss.get_lines()[1].get_xdata()) == [0, 20, 40]
  assert [list(l.get_xdata()) for l in throughput.get_lines()] == [[20, 30, 40], [10, 20]]
  assert len(lr.get_lines()) == len(grad_norm.get_lines()) == 2
  assert [r['label'] for r in runs] == ['a', 'b']


@pytest.mark.e2e
def test_cli_writes_a_png_without_tensorflow_or_jax(resumed_run, tmp_path):
  out = tmp_path / 'plots' / 'loss.png'
  code = ('import runpy, sys; sys.argv = ["train.plot", "--workdir", sys.argv[1], "--workdir", sys.argv[2], '
          '"--out", sys.argv[3]]; runpy.run_module("train.plot", run_name="__main__"); '
          'heavy = [m for m in ("tensorflow", "jax", "flax") if m in sys.modules]; '
          'assert not heavy, heavy')
  other = str(tmp_path / 'other')
  _write_run(other, [_train(10, 3.0, 500.0)])
  proc = run_python('-c', code, resumed_run, other, str(out), timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert out.read_bytes().startswith(b'\x89PNG') and out.stat().st_size > 20_000
  lines = proc.stdout.splitlines()
  assert lines[0].startswith('resumed (') and lines[1].startswith('other (')
  assert lines[-1] == f'Wrote {out}'


@pytest.mark.e2e
def test_cli_names_a_folder_without_metrics(tmp_path):
  proc = run_cli('train.plot', '--workdir', str(tmp_path), timeout=120)
  assert proc.returncode == 1
  assert f'{tmp_path}: no metrics.jsonl or eval_results.json' in proc.stderr

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


def _write_json(workdir, name, value):
  with open(os.path.join(workdir, name), 'w', encoding='utf-8') as f:
    json.dump(value, f)


def test_task_metrics_panel_and_the_best_by_the_early_stopping_metric(tmp_path):
  """An SFT run that scored answers and stopped early on eval_exact_match: a panel of its task metrics,
  and the summary's best is that metric's (best_checkpoint.json), not the lowest held-out loss."""
  workdir = str(tmp_path / 'sft')
  evals = [{'step': 0, 'eval_loss': 5.0, 'eval_perplexity': 148.4, 'eval_tokens': 900.0,
            'eval_exact_match': 0.0, 'eval_rougeL': 1.0},
           {'step': 10, 'eval_loss': 2.0, 'eval_perplexity': 7.4, 'eval_tokens': 900.0,
            'eval_exact_match': 70.0, 'eval_rougeL': 72.0},
           {'step': 20, 'eval_loss': 1.5, 'eval_perplexity': 4.5, 'eval_tokens': 900.0,
            'eval_exact_match': 60.0, 'eval_rougeL': 65.0}]
  _write_run(workdir, [_train(10, 2.5, 800.0), _train(20, 1.8, 800.0)], evals)
  _write_json(workdir, 'config.json', {'train': {'objective': 'lm', 'early_stopping': {
      'metric': 'eval_exact_match', 'mode': '', 'patience': 3}}})
  run = plot.load_run(workdir)
  line = plot.summary(run)
  assert 'held-out loss 5.0000 (step 0) -> 1.5000 (step 20),' in line
  assert 'best eval_exact_match 70.0000 at step 10' in line and 'best 1.5000' not in line
  assert 'exact_match 0.0 (step 0) -> 60.0 (step 20)' in line and 'rougeL 1.0 (step 0) -> 65.0' in line
  _write_json(workdir, 'best_checkpoint.json', {'step': 10, 'metric': 'eval_exact_match', 'value': 70.0,
                                                'mode': 'max'})
  assert 'best eval_exact_match 70.0000 at step 10' in plot.summary(plot.load_run(workdir))
  fig, _ = plot.plot_runs([workdir])
  task = next(ax for ax in fig.axes if ax.get_title().startswith('Task metrics'))
  assert [l.get_label() for l in task.get_lines()] == ['sft exact_match', 'sft rougeL']
  assert list(task.get_lines()[0].get_ydata()) == [0.0, 70.0, 60.0]
  assert fig.axes[0].get_ylabel() == 'cross-entropy (nats/token)'


def test_dpo_run_has_its_loss_named_and_reward_panels(tmp_path, capsys):
  workdir = str(tmp_path / 'dpo')
  records = [{**_train(s, 0.69 - 0.01 * s, 500.0), 'rewards/accuracies': 0.1 * s, 'rewards/margins': 0.05 * s,
              'rewards/chosen': 0.0, 'rewards/rejected': -0.05 * s} for s in (1, 2, 3)]
  evals = [{'step': 0, 'eval_loss': 0.6931, 'eval_pairs': 150.0, 'eval_rewards/accuracies': 0.0,
            'eval_rewards/margins': 0.0},
           {'step': 3, 'eval_loss': 0.5, 'eval_pairs': 150.0, 'eval_rewards/accuracies': 0.9,
            'eval_rewards/margins': 0.4}]
  _write_run(workdir, records, evals)
  _write_json(workdir, 'config.json', {'train': {'objective': 'dpo', 'early_stopping': {'metric': ''}},
                                       'dpo': {'loss': 'sigmoid'}})
  fig, runs = plot.plot_runs([workdir])
  titles = [ax.get_title() for ax in fig.axes]
  assert titles == ['Loss', 'Throughput', 'Learning rate', 'Gradient norm', 'Preference accuracy',
                    'Reward margin']  # no task metrics: none were scored
  assert fig.axes[0].get_ylabel() == 'DPO loss (sigmoid)'
  accuracy = fig.axes[4]
  assert [l.get_label() for l in accuracy.get_lines()] == ['dpo train', 'dpo held-out']
  assert list(accuracy.get_lines()[1].get_ydata()) == [0.0, 90.0]
  assert list(fig.axes[5].get_lines()[0].get_ydata()) == pytest.approx([0.05, 0.1, 0.15])
  line = plot.summary(runs[0])
  assert 'train DPO loss 0.6600' in line and 'held-out DPO loss 0.6931 (step 0) -> 0.5000 (step 3)' in line
  assert 'held-out preference accuracy 0.0% (step 0) -> 90.0% (step 3)' in line

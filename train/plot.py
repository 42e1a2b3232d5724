"""Draws the loss and throughput curves of one or more runs into a PNG.

  python -m train.plot --workdir runs/tiny [--workdir runs/other ...] [--out loss.png]

Reads what every run writes into its workdir: `metrics.jsonl` (train loss, learning rate, gradient
norm, tokens/s and MFU, one line per `train.log_every` steps; preference tuning's rewards/accuracies and
rewards/margins), `eval_results.json` (held-out loss, task metrics and preference accuracy per
evaluation), `config.json` (the objective, early stopping's metric) and `best_checkpoint.json`. Four
panels: train and held-out loss (cross-entropy, or the preference loss of a DPO run), tokens/s,
learning rate, gradient norm; where a run has them, also its task metrics (eval_exact_match, eval_rougeL,
...), preference accuracy and reward margin. One colour per run. A run that was stopped and resumed
logged some steps twice: the later values win. Also prints one summary line per run, whose best
evaluation is that of the run's early-stopping metric (else the lowest held-out loss).

Needs matplotlib, absl and etils, but neither TensorFlow nor JAX: it runs anywhere, e.g. on a laptop
against a copied workdir. gs:// workdirs are read through etils.epath (TensorFlow's file systems where
TensorFlow is installed, else fsspec's gcsfs).
"""

import io
import json
import os
import statistics
import sys
from typing import Any, Sequence

from absl import flags
from etils import epath

import runtime

PANELS = (  # (metric key in metrics.jsonl, panel title, y label)
    ('loss', 'Loss', 'cross-entropy (nats/token)'),
    ('tokens_per_sec', 'Throughput', 'tokens/s'),
    ('learning_rate', 'Learning rate', 'lr'),
    ('grad_norm', 'Gradient norm', 'global L2 norm (before clipping)'),
)
# Drawn when some run has them: (key, title, y label). 'task_metrics' are the eval_<metric> scores of
# generated answers; the preference keys are metrics.jsonl's (train) and eval_<key> (held-out).
EXTRA_PANELS = (
    ('task_metrics', 'Task metrics (held-out answers)', 'score (0-100)'),
    ('rewards/accuracies', 'Preference accuracy', 'pairs with reward chosen > rejected (%)'),
    ('rewards/margins', 'Reward margin', 'reward chosen - rejected'),
)
# Values of eval_results.json that are not task metrics (held-out loss, counts, preference metrics: those
# have a '/').
NOT_TASK_METRICS = ('eval_loss', 'eval_perplexity', 'eval_tokens', 'eval_pairs')
LOWER_IS_BETTER = ('eval_loss', 'eval_perplexity')  # as train/evaluation.py ranks them
LOSS_LABELS = {'lm': 'cross-entropy (nats/token)'}
TRAIN_ONLY = ('tokens_per_sec', 'learning_rate', 'grad_norm')  # panels without held-out curves


def _parse(line: str) -> dict | None:
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    return None
  return record if isinstance(record, dict) and isinstance(record.get('step'), (int, float)) else None


def read_metrics(path: str) -> dict[int, dict[str, float]]:
  """metrics.jsonl -> {step: merged record}. When the steps go back (a resumed run redoing steps
  after its last checkpoint), what the earlier attempt logged from that step on is dropped."""
  by_step: dict[int, dict[str, float]] = {}
  last, bad = -1, []
  with epath.Path(path).open('rb') as f:
    for n, raw in enumerate(f, 1):
      line = raw.decode('utf-8', errors='replace')
      if not line.strip():
        continue
      record = _parse(line)
      if record is None:
        # A process killed mid-write leaves a cut line, which the resumed run then continues: keep
        # the record that starts after the cut.
        starts = [i for i in range(1, len(line)) if line.startswith('{"', i)]
        record = next(filter(None, (_parse(line[i:]) for i in starts)), None)
        bad.append(n)
        if record is None:
          continue
      step = int(record.pop('step'))
      record.pop('time', None)
      if step < last:
        by_step = {s: r for s, r in by_step.items() if s < step}
      last = step
      by_step.setdefault(step, {}).update(record)
  if bad:
    print(f'train.plot: {len(bad)} line(s) of {path} cut short (line {bad[0]}'
          f'{" ..." if len(bad) > 1 else ""}), e.g. by a killed process; the cut record is skipped',
          file=sys.stderr)
  return by_step


def _read_json(path: str) -> Any:
  """A JSON file's value, or None where it is missing or unreadable (a copied workdir may lack it)."""
  try:
    return json.loads(epath.Path(path).read_text())
  except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
    return None


def is_task_metric(key: str) -> bool:
  return key.startswith('eval_') and '/' not in key and key not in NOT_TASK_METRICS


def load_run(workdir: str, label: str | None = None) -> dict[str, Any]:
  """{'label', 'workdir', 'series': {key: ([steps], [values])} of metrics.jsonl, 'eval': ([steps],
  [losses]), 'evals': {eval key: ([steps], [values])} of every evaluation, 'objective', 'loss_label',
  'early_stopping': (metric, mode) or None, 'best': best_checkpoint.json's record or None}."""
  workdir = workdir.rstrip('/')
  metrics_path = f'{workdir}/metrics.jsonl'
  eval_path = f'{workdir}/eval_results.json'
  if not epath.Path(metrics_path).exists() and not epath.Path(eval_path).exists():
    raise FileNotFoundError(f'{workdir}: no metrics.jsonl or eval_results.json; is this the --workdir '
                            'of a training run (train.pretrain, train.sft, train.dpo)?')
  by_step = read_metrics(metrics_path) if epath.Path(metrics_path).exists() else {}
  series: dict[str, tuple[list[int], list[float]]] = {}
  for step in sorted(by_step):
    for key, value in by_step[step].items():
      if key.startswith('eval_'):
        continue
      steps, values = series.setdefault(key, ([], []))
      steps.append(step)
      values.append(float(value))
  if epath.Path(eval_path).exists():  # the trainer's own deduplicated list
    entries = {int(e['step']): e for e in json.loads(epath.Path(eval_path).read_text())}
  else:
    entries = {s: {k: v for k, v in r.items() if k.startswith('eval_')} for s, r in by_step.items()}
  evals: dict[str, tuple[list[int], list[float]]] = {}
  for step in sorted(entries):
    for key, value in entries[step].items():
      if key.startswith('eval_') and isinstance(value, (int, float)):
        steps, values = evals.setdefault(key, ([], []))
        steps.append(step)
        values.append(float(value))
  config = _read_json(f'{workdir}/config.json') or {}
  train = config.get('train', {}) if isinstance(config, dict) else {}
  objective = train.get('objective', 'lm')
  loss = (config.get('dpo') or {}).get('loss', '') if objective == 'dpo' else ''
  stopping = train.get('early_stopping') or {}
  best = _read_json(f'{workdir}/best_checkpoint.json')
  return {'label': label or os.path.basename(workdir) or workdir, 'workdir': workdir, 'series': series,
          'eval': evals.get('eval_loss', ([], [])), 'evals': evals, 'objective': objective,
          'loss_label': LOSS_LABELS.get(objective, f'{objective.upper()} loss' + (f' ({loss})' if loss else '')),
          'early_stopping': ((stopping['metric'], stopping.get('mode') or '')
                             if stopping.get('metric') else None),
          'best': best if isinstance(best, dict) and 'step' in best else None}


def best_evaluation(run: dict[str, Any]) -> tuple[str, int, float] | None:
  """(metric, step, value) of the run's best evaluation: best_checkpoint.json's, else the best of its
  early-stopping metric (after step 0, as early stopping ranks them), else its lowest held-out loss."""
  best = run.get('best')
  if best and isinstance(best.get('value'), (int, float)):
    return best.get('metric', 'eval_loss'), int(best['step']), float(best['value'])
  metric, mode = run.get('early_stopping') or ('eval_loss', 'min')
  steps, values = run.get('evals', {}).get(metric, ([], []))
  if metric != 'eval_loss' or run.get('early_stopping'):
    candidates = [(s, v) for s, v in zip(steps, values) if s > 0]
  else:
    candidates = list(zip(steps, values))
  if not candidates:
    return None
  lower = (mode or ('min' if metric in LOWER_IS_BETTER else 'max')) == 'min'
  step, value = (min if lower else max)(candidates, key=lambda sv: sv[1])
  return metric, step, value


def summary(run: dict[str, Any]) -> str:
  """One line: last step, last train and held-out loss, the best evaluation (by the run's early-stopping
  metric, else the held-out loss), task metrics and preference accuracy first and last, median
  tokens/s, MFU."""
  parts = [f"{run['label']} ({run['workdir']}):"]
  steps, losses = run['series'].get('loss', ([], []))
  evals = run.get('evals', {'eval_loss': run['eval']})
  eval_steps, eval_losses = run['eval']
  last_step = max(steps[-1:] + [s[-1] for s, _ in evals.values() if s], default=None)
  parts.append(f'step {last_step}' if last_step is not None else 'no steps logged')
  objective = run.get('objective', 'lm')
  loss_name = 'loss' if objective == 'lm' else f'{objective.upper()} loss'
  if losses:
    parts.append(f'train {loss_name} {losses[-1]:.4f}')
  best = best_evaluation(run)
  if eval_losses:
    parts.append(f'held-out {loss_name} {eval_losses[0]:.4f} (step {eval_steps[0]}) -> '
                 f'{eval_losses[-1]:.4f} (step {eval_steps[-1]})'
                 + (f', best {best[2]:.4f} at step {best[1]}' if best and best[0] == 'eval_loss' else ''))
  for key in sorted(k for k in evals if is_task_metric(k)):
    s, v = evals[key]
    parts.append(f'{key[5:]} {v[0]:.1f} (step {s[0]}) -> {v[-1]:.1f} (step {s[-1]})')
  s, v = evals.get('eval_rewards/accuracies', ([], []))
  if s:
    parts.append(f'held-out preference accuracy {100 * v[0]:.1f}% (step {s[0]}) -> {100 * v[-1]:.1f}% '
                 f'(step {s[-1]})')
  if best and best[0] != 'eval_loss':
    metric, step, value = best
    parts.append(f'best {metric} {value:.4f} at step {step} (early stopping\'s metric)')
  for key, fmt in (('tokens_per_sec', 'median {:,.0f} tokens/s'), ('mfu', 'median MFU {:.1%}')):
    values = run['series'].get(key, ([], []))[1]
    if values:
      parts.append(fmt.format(statistics.median(values)))
  skipped = sum(run['series'].get('skipped', ([], []))[1])
  if skipped:
    parts.append(f'{int(skipped)} skipped steps')
  return ' '.join(parts[:2]) + (', ' + ', '.join(parts[2:]) if parts[2:] else '')


def _curves(run: dict[str, Any], key: str) -> list[tuple[str, list[int], list[float], bool]]:
  """(label suffix, steps, values, held-out) of each curve a panel draws for one run."""
  if key == 'task_metrics':
    return [(k[5:], *run['evals'][k], True) for k in sorted(run.get('evals', {})) if is_task_metric(k)]
  scale = 100.0 if key == 'rewards/accuracies' else 1.0
  curves = []
  steps, values = run['series'].get(key, ([], []))
  if steps:
    curves.append(('train', steps, [scale * v for v in values], False))
  held_out = run['eval'] if key == 'loss' else run.get('evals', {}).get(f'eval_{key}', ([], []))
  if held_out[0]:
    curves.append(('held-out', held_out[0], [scale * v for v in held_out[1]], True))
  return curves


def figure(runs: Sequence[dict[str, Any]], title: str = ''):
  """A matplotlib Figure (no pyplot, so any backend or none): the four panels of PANELS, then those of
  EXTRA_PANELS that some run has values for."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  panels = list(PANELS) + [p for p in EXTRA_PANELS if any(_curves(run, p[0]) for run in runs)]
  loss_labels = sorted({run.get('loss_label', PANELS[0][2]) for run in runs})
  panels[0] = ('loss', 'Loss', ' / '.join(loss_labels))
  columns = (len(panels) + 1) // 2
  fig = Figure(figsize=(6 * columns, 8), layout='constrained')
  axes = fig.subplots(2, columns).flatten()
  for ax in axes[len(panels):]:
    fig.delaxes(ax)
  for ax, (key, name, ylabel) in zip(axes, panels):
    ax.set_title(name)
    ax.set_xlabel('step')
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    drawn = False
    for i, run in enumerate(runs):
      color = f'C{i % 10}'
      curves = _curves(run, key)
      for j, (suffix, steps, values, held_out) in enumerate(curves):
        # Panels of training values alone name the run; the others say which curve it is.
        label = run['label'] if key in TRAIN_ONLY else f"{run['label']} {suffix}"
        if key == 'task_metrics':  # one colour per run, one marker per metric
          ax.plot(steps, values, color=color, marker='os^vDPX*'[j % 8], markersize=4, label=label)
        elif held_out:
          ax.plot(steps, values, color=color, linestyle='--', marker='o', markersize=4, label=label)
        else:
          ax.plot(steps, values, color=color, label=label)
        drawn = True
    if key == 'learning_rate':
      ax.ticklabel_format(axis='y', style='sci', scilimits=(-3, 3))
    if drawn:
      ax.legend(fontsize='small')
    else:
      ax.text(0.5, 0.5, f'no {key} logged', transform=ax.transAxes, ha='center', va='center',
              color='gray')
  fig.suptitle(title or ', '.join(r['label'] for r in runs))
  return fig


def plot_runs(workdirs: Sequence[str], out: str | None = None, labels: Sequence[str] | None = None,
              title: str = ''):
  """Loads the runs, draws them, and writes a PNG to `out` (if given). Returns (figure, runs)."""
  labels = list(labels or [])
  if len(labels) > len(workdirs):
    raise ValueError(f'{len(labels)} labels for {len(workdirs)} workdirs')
  labels += [None] * (len(workdirs) - len(labels))
  runs = [load_run(w, l) for w, l in zip(workdirs, labels)]
  fig = figure(runs, title)
  if out:
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=100)
    epath.Path(out).parent.mkdir(parents=True, exist_ok=True)
    epath.Path(out).write_bytes(buffer.getvalue())
  return fig, runs


FLAGS = flags.FLAGS  # defined by define_flags() when run as a program


def main(argv):
  # `--workdir A B` (several after one flag) reads as `--workdir A` and a positional B.
  workdirs = list(FLAGS.workdir) + list(argv[1:])
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
  except ImportError:
    sys.exit('error: train.plot needs matplotlib, which is not installed: pip install matplotlib')
  matplotlib.use('Agg')
  try:
    _, runs = plot_runs(workdirs, FLAGS.out, FLAGS.label, FLAGS.title)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  for run in runs:
    print(summary(run))
  print(f'Wrote {FLAGS.out}')


def define_flags():
  flags.DEFINE_multi_string('workdir', None, "A run's --workdir (local or gs://); repeat the flag, or "
                            'list several after it, to compare runs.', required=True)
  flags.DEFINE_string('out', 'loss.png', 'PNG to write.')
  flags.DEFINE_multi_string('label', [], 'Legend name of each run, in --workdir order (default: the '
                            'folder name).')
  flags.DEFINE_string('title', '', 'Figure title (default: the run labels).')


if __name__ == '__main__':
  define_flags()
  runtime.run(main)

"""Draws the loss and throughput curves of one or more runs into a PNG.

  python -m train.plot --workdir runs/tiny [--workdir runs/other ...] [--out loss.png]

Reads what every run writes into its workdir: `metrics.jsonl` (train loss, learning rate, gradient
norm, tokens/s and MFU, one line per `train.log_every` steps) and `eval_results.json` (held-out loss
per evaluation). Four panels: train and held-out loss, tokens/s, learning rate, gradient norm; one
colour per run. A run that was stopped and resumed logged some steps twice: the later values win.
Also prints one summary line per run.

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


def load_run(workdir: str, label: str | None = None) -> dict[str, Any]:
  """{'label', 'workdir', 'series': {key: ([steps], [values])}, 'eval': ([steps], [losses])}."""
  workdir = workdir.rstrip('/')
  metrics_path = f'{workdir}/metrics.jsonl'
  eval_path = f'{workdir}/eval_results.json'
  if not epath.Path(metrics_path).exists() and not epath.Path(eval_path).exists():
    raise FileNotFoundError(f'{workdir}: no metrics.jsonl or eval_results.json; is this the --workdir '
                            'of a train.pretrain or train.sft run?')
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
    evals = sorted((int(e['step']), float(e['eval_loss']))
                   for e in json.loads(epath.Path(eval_path).read_text()))
  else:
    evals = sorted((s, float(r['eval_loss'])) for s, r in by_step.items() if 'eval_loss' in r)
  return {'label': label or os.path.basename(workdir) or workdir, 'workdir': workdir, 'series': series,
          'eval': ([s for s, _ in evals], [v for _, v in evals])}


def summary(run: dict[str, Any]) -> str:
  """One line: last step, last train and held-out loss, best held-out loss, median tokens/s, MFU."""
  parts = [f"{run['label']} ({run['workdir']}):"]
  steps, losses = run['series'].get('loss', ([], []))
  eval_steps, eval_losses = run['eval']
  last_step = max(steps[-1:] + eval_steps[-1:], default=None)
  parts.append(f'step {last_step}' if last_step is not None else 'no steps logged')
  if losses:
    parts.append(f'train loss {losses[-1]:.4f}')
  if eval_losses:
    best = min(range(len(eval_losses)), key=eval_losses.__getitem__)
    parts.append(f'held-out loss {eval_losses[0]:.4f} (step {eval_steps[0]}) -> {eval_losses[-1]:.4f} '
                 f'(step {eval_steps[-1]}), best {eval_losses[best]:.4f} at step {eval_steps[best]}')
  for key, fmt in (('tokens_per_sec', 'median {:,.0f} tokens/s'), ('mfu', 'median MFU {:.1%}')):
    values = run['series'].get(key, ([], []))[1]
    if values:
      parts.append(fmt.format(statistics.median(values)))
  skipped = sum(run['series'].get('skipped', ([], []))[1])
  if skipped:
    parts.append(f'{int(skipped)} skipped steps')
  return ' '.join(parts[:2]) + (', ' + ', '.join(parts[2:]) if parts[2:] else '')


def figure(runs: Sequence[dict[str, Any]], title: str = ''):
  """A matplotlib Figure (no pyplot, so any backend or none) with the four panels."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(12, 8), layout='constrained')
  axes = fig.subplots(2, 2).flatten()
  for ax, (key, name, ylabel) in zip(axes, PANELS):
    ax.set_title(name)
    ax.set_xlabel('step')
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    drawn = False
    for i, run in enumerate(runs):
      color = f'C{i % 10}'
      steps, values = run['series'].get(key, ([], []))
      if steps:
        ax.plot(steps, values, color=color, label=f"{run['label']} train" if key == 'loss' else run['label'])
        drawn = True
      if key == 'loss' and run['eval'][0]:
        ax.plot(*run['eval'], color=color, linestyle='--', marker='o', markersize=4,
                label=f"{run['label']} held-out")
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

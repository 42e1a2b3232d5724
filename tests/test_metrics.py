"""Metric writers: TensorBoard and metrics.jsonl always; Weights & Biases when configured."""

import json
import os
import sys
import types

import pytest

from train import metrics

pytestmark = pytest.mark.unit


def test_jsonl_and_tensorboard(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write(1, {'loss': 2.5, 'skipped': 0})
  writer.write(2, {'loss': 2.0, 'skipped': 1})
  writer.close()
  with open(tmp_path / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  assert [(r['step'], r['loss'], r['skipped']) for r in records] == [(1, 2.5, 0), (2, 2.0, 1)]
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(tmp_path / 'tensorboard'))


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'wandb', None)  # makes `import wandb` fail
  with pytest.raises(ImportError, match="wandb_project is 'proj' but the wandb package is not installed"):
    metrics.MetricWriter(str(tmp_path), wandb_project='proj')


def test_wandb_logs_and_resumes_the_same_run(tmp_path, monkeypatch):
  calls = []

  class Run:
    def log(self, values, step):
      calls.append(('log', step, values))

    def finish(self):
      calls.append(('finish',))

  fake = types.SimpleNamespace(
      init=lambda **kw: calls.append(('init', kw)) or Run(),
      util=types.SimpleNamespace(generate_id=lambda: 'run123'))
  monkeypatch.setitem(sys.modules, 'wandb', fake)
  for _ in range(2):  # a second writer on the same workdir resumes the same W&B run
    writer = metrics.MetricWriter(str(tmp_path), wandb_project='proj', run_config={'a': 1})
    writer.write(5, {'loss': 1.5})
    writer.close()
  inits = [c[1] for c in calls if c[0] == 'init']
  assert [i['id'] for i in inits] == ['run123', 'run123'] and inits[0]['resume'] == 'allow'
  assert inits[0]['project'] == 'proj' and inits[0]['config'] == {'a': 1}
  assert ('log', 5, {'loss': 1.5}) in calls and calls[-1] == ('finish',)


def test_jsonl_on_an_object_store_is_rewritten_not_appended(tmp_path, monkeypatch):
  """gs:// files cannot be appended to: the log keeps its lines and rewrites the file."""
  monkeypatch.setattr(metrics, 'is_remote', lambda path: True)
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1}\n')  # an earlier run of the same workdir
  log = metrics.JsonlLog(str(path), rewrite_every_s=3600)
  log.append({'step': 2})
  assert path.read_text() == '{"step": 1}\n'  # not yet rewritten
  log.append({'step': 3})
  log.close()
  assert [json.loads(line)['step'] for line in path.read_text().splitlines()] == [1, 2, 3]
  log = metrics.JsonlLog(str(path), rewrite_every_s=0)
  log.append({'step': 4})
  assert json.loads(path.read_text().splitlines()[-1]) == {'step': 4}


def test_z_loss_is_logged_only_where_it_is_applied():
  """`z_loss` in the metrics is the term added to the loss, so it is there only with train.z_loss > 0;
  the squared log-partition it penalises is `log_z_squared`, always. The loss is what it was."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from train.step import LanguageModeling  # pylint: disable=import-outside-toplevel
  sums = {'ce': jnp.float32(20.0), 'z': jnp.float32(40.0), 'weight': jnp.float32(10.0)}
  off = LanguageModeling(None).metrics(sums, sums['weight'])
  assert sorted(off) == ['log_z_squared', 'loss', 'tokens']
  assert (float(off['loss']), float(off['log_z_squared']), float(off['tokens'])) == (2.0, 4.0, 10.0)
  on = LanguageModeling(None, z_loss=1e-4)
  assert sorted(on.metrics(sums, sums['weight'])) == ['log_z_squared', 'loss', 'tokens', 'z_loss']
  assert float(on.metrics(sums, sums['weight'])['z_loss']) == pytest.approx(1e-4 * 4.0)
  assert float(on.total(sums)) == pytest.approx(20.0 + 1e-4 * 40.0)


def test_sizes_under_a_hundredth_of_a_gib_are_shown_in_mib():
  import runtime  # pylint: disable=import-outside-toplevel
  assert runtime.format_size(5.2e6) == '4.96 MiB'  # a tiny model's parameters: not "0.00 GiB"
  assert runtime.format_size(10 * 2 ** 20) == '10.00 MiB'
  assert runtime.format_size(0.01 * 2 ** 30) == '0.01 GiB'
  assert runtime.format_size(14.96 * 2 ** 30) == '14.96 GiB'

"""What a run keeps in its workdir besides checkpoints, and the checks made on it.

`config.json` (the run's config, and the check that a resumed run still matches it), `eval_results.json`
(every held-out evaluation, across resumptions) and `final_metrics.json`. Local files are replaced
atomically; on object stores (gs://) a single write is atomic already.
"""

import json
from typing import Any

from etils import epath

from model.params import is_remote
from train import validate

# Keys a resumed run may change: how long to train, how often and how to log/eval/save (early stopping
# included), and the mesh (a checkpoint restores onto any mesh). Everything else changes the run itself.
RESUME_MAY_CHANGE = ('train.steps', 'train.log_every', 'train.eval_every', 'train.eval_at_start',
                     'train.eval_max_batches', 'train.override_workdir_config',
                     'train.max_consecutive_skips', 'train.early_stopping.', 'eval.', 'checkpoint.',
                     'mesh.', 'distributed.', 'init_from', 'logging.')


def _flatten(tree, prefix=''):
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f'{prefix}{key}.').items()}
  return {prefix[:-1]: tree}


def check_config(config: Any, workdir: str, has_checkpoint: bool):
  """Refuses to resume a workdir whose run used a different config, unless told to override."""
  path = epath.Path(workdir) / 'config.json'
  if not has_checkpoint or not path.exists():
    return
  saved = _flatten(json.loads(path.read_text()))
  current = _flatten(json.loads(config.to_json_best_effort()))
  changed = [f'{k}: {saved.get(k, "<absent>")!r} -> {current.get(k, "<absent>")!r}'
             for k in sorted(set(saved) | set(current))
             if saved.get(k) != current.get(k) and not k.startswith(RESUME_MAY_CHANGE)]
  if changed and not config.train.override_workdir_config:
    raise validate.ConfigError(
        f'{workdir} holds a run with a different config; resuming it would mix two runs:\n  '
        + '\n  '.join(changed) + '\nUse a new --workdir, or pass '
        '--config.train.override_workdir_config=True to resume with the new values.')


def write_config(workdir: str, config: Any):
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  write_text(epath.Path(workdir) / 'config.json', config.to_json_best_effort(indent=2))


def write_json(path, value, append_to_existing: bool = False):
  """With `append_to_existing`, `value` (a list) extends what a previous run of the same workdir
  wrote, minus entries for steps this run has redone."""
  path = epath.Path(path)
  if append_to_existing and path.exists():
    earlier = json.loads(path.read_text())
    first_step = value[0]['step']
    value = [e for e in earlier if e['step'] < first_step] + value
  write_text(path, json.dumps(value, indent=2))


def write_text(path, text: str):
  path = epath.Path(path)
  if is_remote(path):
    path.write_text(text)
    return
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(text, encoding='utf-8')
  tmp.replace(path)

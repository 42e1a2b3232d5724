"""Evaluation during training beyond the held-out loss: task metrics of generated answers
(config.eval.generation), and early stopping on any evaluated value (config.train.early_stopping),
which also keeps the best checkpoint.

Generation: every `every_steps` steps (0: with each held-out loss evaluation, train.eval_every), the
model answers the first `num_prompts` held-out conversations greedily (model/evaluation/task_metrics.py), and
the scores join that step's entry of eval_results.json, metrics.jsonl and TensorBoard as
`eval_<metric>` (eval_exact_match, eval_rougeL, ...); each evaluation's answers go to
generation_samples/<step>.jsonl. References that SQuAD's normalisation empties ("The") are counted in a
warning when the run starts: exact_match and f1 count an empty answer as right for them, and
eval_exact_match_strict does not.

Early stopping watches one value of the evaluations after step 0 (`metric`: eval_loss, or any
eval_<task metric> configured): an evaluation is the new best when it beats the best so far by more
than `min_delta` (lower is better for mode 'min', higher for 'max'; by default min for eval_loss and
eval_perplexity, max for task metrics). After `patience` evaluations in a row without a new best the
run stops (patience 0: it never stops, the best is still kept). The best step is saved even when
checkpoint.every_steps would not save it, kept whatever checkpoint.keep rotates away, and named in
WORKDIR/best_checkpoint.json, which `--ckpt WORKDIR:best` reads (model/weights/params.py). A resumed run
replays the evaluations in eval_results.json up to its step, so that it knows the best so far and how
many evaluations have passed without one.
"""

import json
import os
from typing import Any

from absl import logging
from etils import epath

from model import sharding
from model.evaluation import task_metrics
from model.inference.sampler import Generator
from model.weights import params as params_lib
from train import validate
from train import workdir as workdir_lib

LOWER_IS_BETTER = ('eval_loss', 'eval_perplexity')
SAMPLES_DIR = 'generation_samples'


def generation_metrics(config: Any) -> list[str]:
  """The task metrics config.eval.generation.metrics names (comma-separated), checked."""
  names = [m.strip() for m in config.eval.generation.metrics.split(',') if m.strip()]
  try:
    return task_metrics.check_metrics(names) if names else []
  except ValueError as e:
    raise validate.ConfigError(f'config.eval.generation.metrics: {e}') from None


class GenerationEval:
  """Greedy answers to held-out conversations, scored by the task metrics of config.eval.generation."""

  def __init__(self, config: Any, run, data, workdir: str, primary: bool):
    cfg = config.eval.generation
    self.metrics = generation_metrics(config)
    conversations = list(getattr(data, 'eval_conversations', []))[:cfg.num_prompts]
    if not conversations:
      raise validate.ConfigError('config.eval.generation.metrics needs held-out instruction data '
                                 '(train.sft with data.eval_files, or data.eval_fraction > 0)')
    self.where = [w for w, _ in conversations]
    self.questions = [m[-2]['content'] if len(m) > 1 else '' for _, m in conversations]
    self.prompts, self.references = task_metrics.prompts_and_references(data.template, conversations)
    # Once per run: an artifact of the metric that early stopping could otherwise pick a step on.
    task_metrics.warn_empty_references(self.references, self.metrics,
                                       f'the {len(conversations)} held-out conversations scored while '
                                       'tuning (config.eval.generation)')
    self.tokenizer, self.stop_ids = data.tokenizer, data.template.stop_ids
    self.every = cfg.every_steps or config.train.eval_every
    self.max_new_tokens, self.batch_size = cfg.max_new_tokens, cfg.batch_size
    self.samples_dir = epath.Path(workdir) / SAMPLES_DIR
    self.primary = primary
    # One generator for the whole run: its compiled programs serve every evaluation.
    self.generator = Generator(run.model_config, None, run.mesh, sharding.LOGICAL_AXIS_RULES, run.lora)

  def due(self, step: int) -> bool:
    return bool(self.every) and step % self.every == 0

  def __call__(self, params, step: int) -> dict[str, float]:
    self.generator.params = params
    answers = task_metrics.generate_answers(self.generator, self.tokenizer, self.prompts, self.stop_ids,
                                            self.max_new_tokens, self.batch_size, progress=False)
    scores, per_example = task_metrics.score(answers, self.references, self.metrics)
    if self.primary:
      self.samples_dir.mkdir(parents=True, exist_ok=True)
      lines = [json.dumps({'where': w, 'prompt': q, 'reference': r, 'answer': a, **s})
               for w, q, r, a, s in zip(self.where, self.questions, self.references, answers, per_example)]
      workdir_lib.write_text(self.samples_dir / f'{step}.jsonl', ''.join(line + '\n' for line in lines))
    return {f'eval_{k}': v for k, v in scores.items()}


class EarlyStopping:
  """The best evaluation so far of config.train.early_stopping.metric, and when to stop."""

  def __init__(self, config: Any, available: list[str]):
    """`available`: the values the run's evaluations have (e.g. eval_loss, eval_exact_match)."""
    cfg = config.train.early_stopping
    self.metric, self.patience, self.min_delta = cfg.metric, cfg.patience, cfg.min_delta
    self.mode = cfg.mode or ('min' if self.metric in LOWER_IS_BETTER else 'max')
    if self.metric and self.metric not in available:
      raise validate.ConfigError(
          f'config.train.early_stopping.metric is {self.metric!r}, which this run does not evaluate; '
          f'it evaluates {available or "nothing (no held-out data)"}')
    self.best_step: int | None = None
    self.best_value: float | None = None
    self.waiting = 0  # evaluations since the best
    self.stopped_at: int | None = None

  def update(self, step: int, result: dict[str, float]) -> bool:
    """Takes an evaluation; returns whether it is the new best."""
    if not self.metric or step == 0 or self.metric not in result or self.stopped_at is not None:
      return False
    value = result[self.metric]
    if self.best_value is None or (value < self.best_value - self.min_delta if self.mode == 'min'
                                   else value > self.best_value + self.min_delta):
      self.best_step, self.best_value, self.waiting = step, value, 0
      return True
    self.waiting += 1
    if self.patience and self.waiting >= self.patience:
      self.stopped_at = step
    return False

  def replay(self, workdir: str, up_to_step: int, checkpoints):
    """Takes again the evaluations of eval_results.json up to `up_to_step` (a resumed run)."""
    path = epath.Path(workdir) / 'eval_results.json'
    if not self.metric or not path.exists():
      return
    for entry in json.loads(path.read_text()):
      if entry['step'] <= up_to_step:
        self.update(entry['step'], entry)
    if self.best_step is not None and not (checkpoints / str(self.best_step) / params_lib.STATE).exists():
      logging.warning('Early stopping: the best evaluation so far (step %d, %s %.4f) has no checkpoint '
                      '(rotated away before early stopping watched %s); the best is counted afresh',
                      self.best_step, self.metric, self.best_value, self.metric)
      self.best_step = self.best_value = self.stopped_at = None
      self.waiting = 0
    if self.best_step is not None:
      logging.info('Early stopping: best so far step %d (%s %.4f), %d evaluation(s) since', self.best_step,
                   self.metric, self.best_value, self.waiting)

  def publish(self, workdir: str, checkpoints):
    """Names the best step in WORKDIR/best_checkpoint.json, once its checkpoint is on storage."""
    if self.best_step is not None and (checkpoints / str(self.best_step) / params_lib.STATE).exists():
      workdir_lib.write_json(os.path.join(workdir, params_lib.BEST_RECORD), {
          'step': self.best_step, 'metric': self.metric, 'value': self.best_value, 'mode': self.mode})

  def summary(self, checkpoints) -> dict[str, Any]:
    """For final_metrics.json: the best step, its value and checkpoint, and where the run stopped."""
    if self.best_step is None:
      return {}
    out = {'best_step': self.best_step, f'best_{self.metric}': self.best_value,
           'best_checkpoint': str(checkpoints / str(self.best_step))}
    return {**out, **({'stopped_early_at': self.stopped_at} if self.stopped_at is not None else {})}

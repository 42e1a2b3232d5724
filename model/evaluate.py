"""`python -m model.evaluate`: a checkpoint on lm-evaluation-harness tasks, in process; and the task
metrics of its answers to a held-out instruction set.

  python -m model.evaluate --ckpt runs/sft --tokenizer demo/tokenizer.model \\
      --include_path data/eval_tasks --tasks flaxlm_words,flaxlm_docs [--num_fewshot N] [--limit N] \\
      [--apply_chat_template --chat_template llama2] [--batch_size 16] [--output_path OUT --log_samples] \\
      [--dtype float32|bfloat16] [--param_dtype bfloat16] [--mesh 1,-1,1]
  python -m model.evaluate generate-metrics --ckpt runs/sft --tokenizer demo/tokenizer.model \\
      --data demo/sft_data/eval.jsonl --chat_template llama2 [--format chat|sharegpt|...] \\
      [--roles human=user,gpt=assistant] [--metrics exact_match,exact_match_strict,f1] \\
      [--output answers.jsonl] [--json_out scores.json]

The first takes lm-eval's own flags (those of `lm_eval run`), prints its results table, and writes
under --output_path what lm-eval's CLI writes there (its EvaluationTracker: a folder named after --ckpt
holding results_<date>.json and, with --log_samples, samples_<task>_<date>.jsonl), so that tooling made
for lm-eval reads them. It needs lm-eval (requirements-eval.txt). Tasks whose data is local
(--include_path with task YAMLs over local JSON/JSONL files, as data/eval_tasks/) run offline
(HF_DATASETS_OFFLINE=1); a task that needs a download fails at once, before the model is loaded,
saying so. Every task's data is read before the checkpoint is.

`generate-metrics` answers each held-out record (any SFT format: data/instructions.py) greedily, from
the conversation before its last assistant message, and scores the answers against those messages
(model/evaluation/task_metrics.py: exact match, token F1, ROUGE-1/2/L, BLEU, chrF; strict exact match on
request), per task where records have a "task" field (a JSON field or a Parquet column: the same records
give the same report in either); --output writes each answer and its scores as JSONL. References that
SQuAD's normalisation turns into nothing ("The") are counted in a warning.

Multi-host (a TPU slice): run the same command on every host. Each runs the whole (deterministic)
harness as if it were the only process, issuing the same computations on the mesh; only process 0
prints and writes files.
"""

import json
import os

import jax
from absl import app, flags, logging

from data import chat, instructions
from data import config as data_config
from data.tokenizer import load_tokenizer
from model import sharding
from model.evaluation import task_metrics
from model.generate import define_model_flags, model_from_flags
from model.inference.sampler import Generator
from model.weights import params as params_lib
import runtime

FLAGS = flags.FLAGS  # defined by define_flags() when run as a program
# Each command and the flags it needs (runtime.parse_command checks them); without a command, lm-eval.
COMMANDS = {'lm-eval': ('ckpt', 'tokenizer', 'tasks'), 'generate-metrics': ('ckpt', 'tokenizer', 'data')}
DEFAULT_COMMAND = 'lm-eval'


# --------------------------------------------------------------------------------------------------
# lm-evaluation-harness

def run_lm_eval():
  if FLAGS.log_samples and not FLAGS.output_path:
    raise app.UsageError('Specify --output_path if providing --log_samples')  # as lm-eval says it
  try:
    import lm_eval  # pylint: disable=import-outside-toplevel
    from lm_eval.loggers import EvaluationTracker  # pylint: disable=import-outside-toplevel
    from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
    from lm_eval.utils import make_table  # pylint: disable=import-outside-toplevel
    from model.evaluation.harness import FlaxLM  # pylint: disable=import-outside-toplevel  (imports lm_eval)
  except ImportError as e:
    raise SystemExit(f'python -m model.evaluate needs lm-eval ({e}): pip install -r requirements-eval.txt')
  # What lm-eval records as the model's arguments; `pretrained` names the output folder.
  model_args = {'pretrained': FLAGS.ckpt, 'tokenizer': FLAGS.tokenizer,
                **{k: FLAGS[k].value for k in ('dtype', 'param_dtype', 'mesh', 'chat_template')
                   if FLAGS[k].value}}
  task_manager = TaskManager(include_path=FLAGS.include_path or None, metadata=model_args)
  names = [t.strip() for t in FLAGS.tasks.split(',') if t.strip()]
  unknown = [t for t in names if not task_manager.match_tasks([t])]
  if unknown:
    raise app.UsageError(f'tasks not found: {", ".join(unknown)}' + (
        '' if FLAGS.include_path else ' (--include_path DIR adds the task YAMLs of DIR)'))
  try:  # reads every task's data now, before the model: a task that needs a download fails at once
    task_manager.load(names)
  except ConnectionError as e:
    raise SystemExit(f'a task needs to download its data, and this machine is offline or '
                     f'HF_DATASETS_OFFLINE=1 is set: {" ".join(str(e).split())}') from None
  except FileNotFoundError as e:
    raise SystemExit(f'a task\'s data file is missing: {e}') from None

  with runtime.flag_error('tokenizer'):
    tokenizer = load_tokenizer(FLAGS.tokenizer)
  template = chat.template_from_flags(tokenizer, none_if_unset=False) if FLAGS.apply_chat_template else None
  cfg, lora, params, mesh = model_from_flags(tokenizer)
  lm = FlaxLM(cfg, params, tokenizer, template, mesh=mesh, batch_size=FLAGS.batch_size,
              max_length=FLAGS.max_length, seed=FLAGS.seed, lora=lora,
              info={'checkpoint': str(params_lib.resolve_step_dir(FLAGS.ckpt))})
  multiturn = FLAGS.fewshot_as_multiturn
  if multiturn is None:
    multiturn = True if FLAGS.apply_chat_template else None  # lm-eval's default
  tracker = EvaluationTracker(output_path=FLAGS.output_path or None)
  results = lm_eval.simple_evaluate(
      model=lm, model_args=model_args, tasks=names, task_manager=task_manager,
      num_fewshot=FLAGS.num_fewshot, limit=FLAGS.limit, batch_size=lm.batch_size,
      bootstrap_iters=FLAGS.bootstrap_iters, log_samples=FLAGS.log_samples, evaluation_tracker=tracker,
      system_instruction=FLAGS.system_instruction or None,
      apply_chat_template=FLAGS.apply_chat_template, fewshot_as_multiturn=multiturn,
      gen_kwargs=FLAGS.gen_kwargs or None, random_seed=FLAGS.seed)
  if results is None or jax.process_index() != 0:
    return
  samples = results.pop('samples') if FLAGS.log_samples else None
  if FLAGS.output_path:
    tracker.save_results_aggregated(results=results, samples=samples)  # first: it dates the files
    for task in results['configs'] if FLAGS.log_samples else ():
      tracker.save_results_samples(task_name=task, samples=samples[task])
  args = ','.join(f'{k}={v}' for k, v in model_args.items())
  print(f'flaxlm ({args}), gen_kwargs: ({FLAGS.gen_kwargs or None}), limit: {FLAGS.limit}, '
        f'num_fewshot: {FLAGS.num_fewshot}, batch_size: {lm.batch_size}')
  print(make_table(results))
  if 'groups' in results:
    print(make_table(results, 'groups'))


# --------------------------------------------------------------------------------------------------
# Task metrics of generated answers

def run_generate_metrics():
  with runtime.flag_error('metrics'):
    metrics = task_metrics.check_metrics(FLAGS.metrics)
  cfg = data_config.get_config()
  cfg.format, cfg.roles = FLAGS.format, FLAGS.roles
  try:
    cfg.fields.update(json.loads(FLAGS.fields) if FLAGS.fields else {})
  except (json.JSONDecodeError, KeyError) as e:
    raise app.UsageError(f'--fields: {e}') from None
  with runtime.flag_error('roles'):
    instructions.role_map(cfg)
  with runtime.flag_error('data'):  # a BadRecord names the file and line
    records = instructions.conversations(FLAGS.data, cfg, int(FLAGS.limit or 0))
  with runtime.flag_error('tokenizer'):
    tokenizer = load_tokenizer(FLAGS.tokenizer)
  template = chat.template_from_flags(tokenizer, none_if_unset=False)
  try:
    prompts, references = task_metrics.prompts_and_references(template, [(w, m) for w, m, _ in records])
  except ValueError as e:
    raise SystemExit(str(e)) from None
  task_metrics.warn_empty_references(references, metrics, f'the {len(references)} records of {FLAGS.data}')
  model_config, lora, params, mesh = model_from_flags(tokenizer)
  generator = Generator(model_config, params, mesh, sharding.LOGICAL_AXIS_RULES, lora)
  answers = task_metrics.generate_answers(generator, tokenizer, prompts, template.stop_ids,
                                          FLAGS.max_new_tokens, FLAGS.batch_size)
  scores, per_example = task_metrics.score(answers, references, metrics)
  tasks = [r.get('task') if isinstance(r, dict) else None for _, _, r in records]
  per_task = {}
  for task in sorted({t for t in tasks if isinstance(t, str)}):
    rows = [i for i, t in enumerate(tasks) if t == task]
    per_task[task] = task_metrics.score([answers[i] for i in rows], [references[i] for i in rows],
                                        metrics)[0]
  if jax.process_index() != 0:
    return

  shown = {}
  for (where, messages, _), task, answer, reference, example in zip(records, tasks, answers, references,
                                                                     per_example):
    key = task or ''
    if shown.get(key, 0) < FLAGS.show:
      shown[key] = shown.get(key, 0) + 1
      question = messages[-2]['content'] if len(messages) > 1 else ''
      mark = 'ok ' if task_metrics.exact_match(answer, reference) else 'BAD'
      print(f'  [{mark}] {question!r} -> {answer!r} (expected {reference!r})')
  summary = ' | '.join(f'{m} {v:.1f}' for m, v in scores.items())
  print(f'{FLAGS.label}{len(records)} held-out answers: {summary}')
  for task, values in per_task.items():
    print(f'  {task}: ' + ' | '.join(f'{m} {v:.1f}' for m, v in values.items()))
  if FLAGS.output:
    with open(FLAGS.output, 'w', encoding='utf-8') as f:
      for (where, messages, _), task, answer, reference, example in zip(records, tasks, answers,
                                                                         references, per_example):
        question = messages[-2]['content'] if len(messages) > 1 else ''
        f.write(json.dumps({'where': where, **({'task': task} if task else {}), 'prompt': question,
                            'reference': reference, 'answer': answer, **example}) + '\n')
  if FLAGS.json_out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json_out)), exist_ok=True)
    with open(FLAGS.json_out, 'w', encoding='utf-8') as f:
      json.dump({'checkpoint': str(params_lib.resolve_step_dir(FLAGS.ckpt)), 'examples': len(records),
                 'metrics': scores, 'per_task': per_task}, f, indent=2)
  logging.info('Scored %d answers of %s', len(records), FLAGS.ckpt)


def main(argv):
  command = runtime.parse_command(argv, COMMANDS, DEFAULT_COMMAND)
  runtime.setup(keep_freed_memory=False)
  if command == 'lm-eval':
    run_lm_eval()
  else:
    run_generate_metrics()


def define_flags():
  # Both commands
  flags.DEFINE_string('ckpt', None, 'Workdir (its latest step, or WORKDIR:best), checkpoints folder or '
                      'step folder.')
  flags.DEFINE_string('tokenizer', None, 'SentencePiece .model, HF tokenizer.json, or a folder holding '
                      'one.')
  flags.DEFINE_integer('batch_size', 16, 'Requests (lm-eval) or prompts (generate-metrics) per batch.',
                       lower_bound=1)
  define_model_flags()
  flags.DEFINE_integer('seed', 0, 'lm-eval\'s random seed; sampled generation\'s seed.')
  flags.DEFINE_float('limit', None, 'lm-eval: documents per task (a count, or a fraction below 1; for '
                     'testing); generate-metrics: the first N records.', lower_bound=0)
  chat.define_template_flags('The chat template: lm-eval\'s, with --apply_chat_template; '
                             'generate-metrics renders its prompts with it (default: the tokenizer '
                             'folder\'s own, else llama2).')
  # lm-eval (the names of `lm_eval run`'s flags)
  flags.DEFINE_string('tasks', None, 'Comma-separated task (or group) names; globs work.')
  flags.DEFINE_integer('num_fewshot', None, 'Few-shot examples per prompt (default: the task\'s).')
  flags.DEFINE_string('include_path', '', 'A folder of task YAMLs to add to lm-eval\'s (e.g. '
                      'data/eval_tasks).')
  flags.DEFINE_bool('apply_chat_template', False, 'Render prompts with the chat template.')
  flags.DEFINE_bool('fewshot_as_multiturn', None, 'Few-shot examples as chat turns (default: with '
                    '--apply_chat_template).')
  flags.DEFINE_string('system_instruction', '', 'A system instruction for every prompt.')
  flags.DEFINE_string('gen_kwargs', '', 'Generation settings over the tasks\' own, e.g. '
                      '"temperature=0.7,do_sample=True".')
  flags.DEFINE_string('output_path', '', 'Write results (and samples) here, as lm-eval does.')
  flags.DEFINE_bool('log_samples', False, 'Also write every request and response, per task.')
  flags.DEFINE_integer('bootstrap_iters', 100000, 'Bootstrap iterations for standard errors (0: none).',
                       lower_bound=0)
  flags.DEFINE_integer('max_length', 0, 'Longest input the model reads (default: the checkpoint\'s '
                       'max_seq_len).', lower_bound=0)
  # generate-metrics
  flags.DEFINE_string('data', None, 'generate-metrics: held-out records (files or globs, comma-separated), '
                      'each ending with the assistant answer to score.')
  flags.DEFINE_enum('format', 'chat', list(data_config.SFT_FORMATS), 'generate-metrics: the records\' '
                    'format.')
  flags.DEFINE_string('fields', '', 'generate-metrics: field names, as config.data.fields, as JSON (e.g. '
                      '\'{"prompt": "question", "completion": "answer"}\').')
  flags.DEFINE_string('roles', '', 'generate-metrics: role renames, as config.data.roles (e.g. '
                      '"human=user,gpt=assistant"; --format sharegpt has those).')
  flags.DEFINE_list('metrics', list(task_metrics.DEFAULT_METRICS), 'generate-metrics: which metrics, of '
                    f'{", ".join(task_metrics.METRICS)}.')
  flags.DEFINE_integer('max_new_tokens', 32, 'generate-metrics: tokens per answer at most.', lower_bound=1)
  flags.DEFINE_string('output', '', 'generate-metrics: write each answer and its scores here (JSONL).')
  flags.DEFINE_string('json_out', '', 'generate-metrics: write the scores here (JSON).')
  flags.DEFINE_string('label', '', 'generate-metrics: prefix for the printed summary line.')
  flags.DEFINE_integer('show', 3, 'generate-metrics: print this many answers per task.', lower_bound=0)
  runtime.dashed_aliases(['batch_size', 'num_fewshot', 'include_path', 'apply_chat_template',
                          'fewshot_as_multiturn', 'system_instruction', 'gen_kwargs', 'output_path',
                          'log_samples', 'bootstrap_iters', 'max_length', 'max_new_tokens', 'json_out'])


if __name__ == '__main__':
  define_flags()
  runtime.run(main)

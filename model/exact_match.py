"""Exact-match accuracy of a checkpoint's answers on held-out conversations.

For each record of a chat JSONL file ({"messages": [..., {"role": "assistant", ...}]}), the model
answers the conversation without its last assistant turn (greedy), and the answer counts as correct
when it equals that turn exactly (after stripping whitespace). Records with a "task" field are also
scored per task.

  python -m model.exact_match --ckpt demo/sft --tokenizer demo/tokenizer.model \\
      --data demo/sft/eval.jsonl --chat-template llama2
"""

import collections
import dataclasses
import json

import tqdm
from absl import app, flags

from data import chat
from data.tokenizer import load_tokenizer
from model import adapters, runtime
from model.generate import Generator, SamplingConfig, compute_dtype, define_dtype_flag


def load_records(path: str, limit: int = 0) -> list[dict]:
  records = []
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      record = json.loads(line)
      messages = record.get('messages')
      if not messages or messages[-1].get('role') != 'assistant':
        raise ValueError(f'{path}:{n}: expected "messages" ending with an assistant turn')
      records.append(record)
      if limit and len(records) == limit:
        break
  return records


def exact_match(generator: Generator, tokenizer, template: chat.ChatTemplate, records: list[dict],
                max_new_tokens: int = 16, batch_size: int = 64, progress: bool | None = None) -> dict:
  """{'accuracy', 'per_task', 'answers': [(prompt, expected, got)]}. `progress`: a bar of questions
  answered on stderr (None: only on a terminal)."""
  prompts = [template.prompt_ids(r['messages'][:-1]) for r in records]
  sampling = SamplingConfig(max_new_tokens=max_new_tokens)
  answers = []
  with tqdm.tqdm(total=len(prompts), desc='Answering', unit='question',
                 disable=None if progress is None else not progress) as bar:
    for i in range(0, len(prompts), batch_size):
      outputs = generator.generate(prompts[i:i + batch_size], sampling, template.stop_ids, tokenizer.pad_id)
      answers += [tokenizer.decode(o).strip() for o in outputs]
      bar.update(len(outputs))
  scores = collections.defaultdict(list)
  rows = []
  for record, got in zip(records, answers):
    expected = record['messages'][-1]['content'].strip()
    correct = got == expected
    scores['all'].append(correct)
    if 'task' in record:
      scores[record['task']].append(correct)
    rows.append((record['messages'][-2]['content'], expected, got))
  mean = lambda xs: sum(xs) / len(xs)
  return {'accuracy': mean(scores.pop('all')), 'per_task': {k: mean(v) for k, v in sorted(scores.items())},
          'answers': rows}


FLAGS = flags.FLAGS  # defined by define_flags() when run as a program


def main(argv):
  runtime.no_positional_arguments(argv)
  runtime.setup(keep_freed_memory=False)
  model_config, lora, params = adapters.load_model(FLAGS.ckpt)  # LoRA checkpoints: unmerged
  model_config = dataclasses.replace(model_config, dtype=compute_dtype(FLAGS.dtype))
  tokenizer = load_tokenizer(FLAGS.tokenizer)
  records = load_records(FLAGS.data, FLAGS.limit)
  result = exact_match(Generator(model_config, params, lora=lora), tokenizer,
                       chat.template_from_flags(tokenizer), records)

  shown = collections.Counter()
  for record, (question, expected, got) in zip(records, result['answers']):
    task = record.get('task', 'all')
    if shown[task] < FLAGS.show:
      shown[task] += 1
      mark = 'ok ' if got == expected else 'BAD'
      print(f'  [{mark}] {question!r} -> {got!r} (expected {expected!r})')
  per_task = ', '.join(f'{k} {100 * v:.0f}%' for k, v in result['per_task'].items())
  print(f"{FLAGS.label}exact-match accuracy {100 * result['accuracy']:.1f}% on {len(records)} "
        f"held-out questions, computed in {model_config.dtype}" + (f' ({per_task})' if per_task else ''))
  if FLAGS.json_out:
    with open(FLAGS.json_out, 'w', encoding='utf-8') as f:
      json.dump({k: v for k, v in result.items() if k != 'answers'}, f, indent=2)


def define_flags():
  flags.DEFINE_string('ckpt', None, 'Workdir, checkpoints folder or step folder.', required=True)
  flags.DEFINE_string('tokenizer', None, 'SentencePiece .model, HF tokenizer.json, or a folder holding '
                      'one.', required=True)
  flags.DEFINE_string('data', None, 'Chat JSONL whose last turns are the answers.', required=True)
  chat.define_template_flags('The chat template to prompt with.', required=True)
  flags.DEFINE_integer('limit', 0, 'Score only the first N records.', lower_bound=0)
  flags.DEFINE_integer('show', 3, 'Print this many answers per task.', lower_bound=0)
  flags.DEFINE_string('label', '', 'Prefix for the printed summary line.')
  flags.DEFINE_string('json_out', '', 'Also write the scores to this JSON file.')
  define_dtype_flag()
  runtime.dashed_aliases(['json_out'])


if __name__ == '__main__':
  define_flags()
  app.run(main)

"""Exact-match accuracy of a checkpoint's answers on held-out conversations.

For each record of a chat JSONL file ({"messages": [..., {"role": "assistant", ...}]}), the model
answers the conversation without its last assistant turn (greedy), and the answer counts as correct
when it equals that turn exactly (after stripping whitespace). Records with a "task" field are also
scored per task.

  python -m model.exact_match --ckpt demo/sft --tokenizer demo/tokenizer.model \\
      --data demo/sft/eval.jsonl --chat-template llama2
"""

import argparse
import collections
import json
import sys

import jax
import jax.numpy as jnp
import flax.linen as nn
import tqdm

from data import chat
from data.tokenizer import load_tokenizer
from model.generate import Generator, SamplingConfig
from model.transformer import Transformer


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


def exact_match(generator: Generator, tokenizer, template: chat.Template, records: list[dict],
                max_new_tokens: int = 16, batch_size: int = 64, progress: bool | None = None) -> dict:
  """{'accuracy', 'per_task', 'answers': [(prompt, expected, got)]}. `progress`: a bar of questions
  answered on stderr (None: only on a terminal)."""
  prompts = [template.prompt_ids(tokenizer, r['messages'][:-1]) for r in records]
  sampling = SamplingConfig(max_new_tokens=max_new_tokens)
  answers = []
  with tqdm.tqdm(total=len(prompts), desc='Answering', unit='question',
                 disable=None if progress is None else not progress) as bar:
    for i in range(0, len(prompts), batch_size):
      outputs = generator.generate(prompts[i:i + batch_size], sampling, template.stop_ids(tokenizer),
                                   tokenizer.pad_id)
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


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--ckpt', required=True, help='Workdir, checkpoints folder or step folder.')
  parser.add_argument('--tokenizer', required=True)
  parser.add_argument('--data', required=True, help='Chat JSONL whose last turns are the answers.')
  parser.add_argument('--chat-template', '--chat_template', dest='chat_template', required=True)
  parser.add_argument('--limit', type=int, default=0, help='Score only the first N records.')
  parser.add_argument('--show', type=int, default=3, help='Print this many answers per task.')
  parser.add_argument('--label', default='', help='Prefix for the printed summary line.')
  parser.add_argument('--json-out', '--json_out', dest='json_out', default='',
                      help='Also write the scores to this JSON file.')
  args = parser.parse_args(argv)

  from train import checkpoint  # pylint: disable=import-outside-toplevel  (entry point)
  model_config = checkpoint.load_model_config(args.ckpt)
  abstract = nn.meta.unbox(jax.eval_shape(lambda: Transformer(model_config).init(
      jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))['params'])
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
  params = checkpoint.load_params(args.ckpt, abstract)
  tokenizer = load_tokenizer(args.tokenizer)
  records = load_records(args.data, args.limit)
  result = exact_match(Generator(model_config, params), tokenizer, chat.get_template(args.chat_template),
                       records)

  shown = collections.Counter()
  for record, (question, expected, got) in zip(records, result['answers']):
    task = record.get('task', 'all')
    if shown[task] < args.show:
      shown[task] += 1
      mark = 'ok ' if got == expected else 'BAD'
      print(f'  [{mark}] {question!r} -> {got!r} (expected {expected!r})')
  per_task = ', '.join(f'{k} {100 * v:.0f}%' for k, v in result['per_task'].items())
  print(f"{args.label}exact-match accuracy {100 * result['accuracy']:.1f}% on {len(records)} "
        f"held-out questions" + (f' ({per_task})' if per_task else ''))
  if args.json_out:
    with open(args.json_out, 'w', encoding='utf-8') as f:
      json.dump({k: v for k, v in result.items() if k != 'answers'}, f, indent=2)


if __name__ == '__main__':
  sys.exit(main())

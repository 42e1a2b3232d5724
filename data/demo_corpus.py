"""Writes the demo corpus from text that ships with CPython, so the demo runs offline anywhere.

Two sources of real English that no one here wrote: the documentation topics in `pydoc_data` (split
into paragraph groups of ~1-2 KB) and the longer docstrings of the standard library, read with `ast`
(nothing is imported). About 1.7 MB in all; the exact text depends on the Python version. A fixed
share of documents, chosen by a hash of their name, is held out for evaluation.

With --sft_out it also writes an instruction set whose answers can be checked: questions about
sentences of the corpus ("What is the last word of this sentence?"), each with one correct answer.
Training questions come from training documents (all three questions about each sentence), held-out
questions from held-out documents (one per sentence). With --preference_out it also writes preference
pairs of the same questions (TRL's prompt, chosen, rejected; one per sentence, drawn in another order):
the correct answer chosen, a wrong one (another word of the sentence, a count off by one to three)
rejected.

  python -m data.demo_corpus --out demo/data --sft_out demo/sft_data --preference_out demo/dpo_data
"""

import ast
import glob
import hashlib
import json
import os
import random
import re
import sysconfig
from typing import Iterator

import tqdm
from absl import flags

import runtime

FLAGS = flags.FLAGS  # defined by _define_flags() when run as a program

MIN_DOCSTRING_CHARS = 200
TOPIC_CHUNK_CHARS = 1000


def pydoc_topics(progress=None) -> Iterator[tuple[str, str]]:
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  for name, text in sorted(topics.topics.items()):
    if progress is not None:
      progress.update(1)
    chunk, part = [], 0
    for paragraph in text.split('\n\n'):
      chunk.append(paragraph)
      if sum(map(len, chunk)) >= TOPIC_CHUNK_CHARS:
        yield f'topic:{name}:{part}', '\n\n'.join(chunk).strip()
        chunk, part = [], part + 1
    if chunk and '\n\n'.join(chunk).strip():
      yield f'topic:{name}:{part}', '\n\n'.join(chunk).strip()


def stdlib_files() -> list[tuple[str, str]]:
  """(path, path relative to the standard library) of the modules whose docstrings we read."""
  root = sysconfig.get_paths()['stdlib']
  paths = sorted(glob.glob(os.path.join(root, '**', '*.py'), recursive=True))
  return [(path, rel) for path, rel in ((p, os.path.relpath(p, root)) for p in paths)
          if not (rel.startswith(('site-packages', 'test', 'idlelib')) or '/test' in rel)]


def stdlib_docstrings(progress=None) -> Iterator[tuple[str, str]]:
  for path, rel in stdlib_files():
    if progress is not None:
      progress.update(1)
    try:
      with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
      continue
    for node in ast.walk(tree):
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node)
        if doc and len(doc) >= MIN_DOCSTRING_CHARS:
          yield f'doc:{rel}:{getattr(node, "name", "")}:{getattr(node, "lineno", 0)}', doc


def is_held_out(name: str, percent: int) -> bool:
  return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100 < percent


def write_corpus(out_dir: str, eval_percent: int = 5) -> dict[str, int]:
  """Writes train.jsonl and eval.jsonl ({"title", "text"} per line); returns document counts."""
  os.makedirs(out_dir, exist_ok=True)
  counts = {'train': 0, 'eval': 0}
  tmp = {split: os.path.join(out_dir, f'{split}.jsonl.tmp') for split in counts}
  files = {split: open(path, 'w', encoding='utf-8') for split, path in tmp.items()}
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  # On a terminal: a bar over the sources read (pydoc topics, then standard library files).
  bar = tqdm.tqdm(total=len(topics.topics) + len(stdlib_files()), desc='Writing the demo corpus',
                  unit='source', disable=None)
  try:
    for source in (pydoc_topics(bar), stdlib_docstrings(bar)):
      for name, text in source:
        split = 'eval' if is_held_out(name, eval_percent) else 'train'
        files[split].write(json.dumps({'title': name, 'text': text}) + '\n')
        counts[split] += 1
        bar.set_postfix(documents=sum(counts.values()), refresh=False)
  finally:
    bar.close()
    for f in files.values():
      f.close()
  for split, path in tmp.items():
    os.replace(path, os.path.join(out_dir, f'{split}.jsonl'))
  return counts


WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*$")
QUESTIONS = {
    'first_word': ('What is the first word of this sentence?', lambda words: words[0]),
    'last_word': ('What is the last word of this sentence?', lambda words: words[-1]),
    'word_count': ('How many words are in this sentence?', lambda words: str(len(words))),
}


def sentences(text: str) -> Iterator[list[str]]:
  """Plain sentences of 4 to 9 words (letters only, trailing punctuation removed)."""
  for sentence in re.split(r'(?<=[.!?])\s+|\n+', text):
    words = [w.rstrip('.,;:!?') for w in sentence.split()]
    if 4 <= len(words) <= 9 and all(WORD.match(w) for w in words):
      yield words


def instruction_examples(corpus_file: str, n: int, seed: int, questions_per_sentence: int = 1) -> list[dict]:
  """Up to n questions about sentences of `corpus_file`, `questions_per_sentence` different ones about
  each sentence (the tasks taking turns), in a shuffled order."""
  with open(corpus_file, encoding='utf-8') as f:
    pool = [words for line in f for words in sentences(json.loads(line)['text'])]
  rng = random.Random(seed)
  rng.shuffle(pool)
  tasks = sorted(QUESTIONS)
  examples = []
  for i, words in enumerate(pool):
    for j in range(questions_per_sentence):
      task = tasks[(i + j) % len(tasks)]
      question, answer = QUESTIONS[task]
      examples.append({'task': task, 'messages': [
          {'role': 'user', 'content': f'{question}\n{" ".join(words)}'},
          {'role': 'assistant', 'content': answer(words)}]})
  examples = examples[:n]
  if questions_per_sentence > 1:  # else already in the pool's shuffled order, as before
    rng.shuffle(examples)
  return examples


def wrong_answer(task: str, words: list[str], rng: random.Random) -> str:
  """A plausible wrong answer: another word of the sentence, or a count off by one to three."""
  right = QUESTIONS[task][1](words)
  if task == 'word_count':
    return str(len(words) + rng.choice([-3, -2, -1, 1, 2, 3]))
  return rng.choice([w for w in words if w != right])


def preference_pairs(corpus_file: str, n: int, seed: int, questions_per_sentence: int = 1) -> list[dict]:
  """Preference pairs of the instruction questions: the correct answer chosen, a wrong one rejected."""
  rng = random.Random(seed)
  pairs = []
  for example in instruction_examples(corpus_file, n, seed, questions_per_sentence):
    user, answer = example['messages']
    words = user['content'].split('\n', 1)[1].split()
    if len(set(words)) < 2:  # no other word to reject
      continue
    pairs.append({'task': example['task'], 'prompt': [user],
                  'chosen': [answer],
                  'rejected': [{'role': 'assistant', 'content': wrong_answer(example['task'], words, rng)}]})
  return pairs


def write_instruction_task(corpus_dir: str, out_dir: str, n_train: int, n_eval: int,
                           make=instruction_examples, seeds=(0, 1),
                           train_questions_per_sentence: int = 1,
                           eval_questions_per_sentence: int = 1) -> dict[str, int]:
  """Writes train.jsonl and eval.jsonl in the chat format (plus a "task" field per record); with
  `make=preference_pairs`, preference pairs."""
  os.makedirs(out_dir, exist_ok=True)
  counts = {}
  for split, n, seed in (('train', n_train, seeds[0]), ('eval', n_eval, seeds[1])):
    examples = make(os.path.join(corpus_dir, f'{split}.jsonl'), n, seed,
                    train_questions_per_sentence if split == 'train' else eval_questions_per_sentence)
    tmp = os.path.join(out_dir, f'{split}.jsonl.tmp')
    with open(tmp, 'w', encoding='utf-8') as f:
      f.writelines(json.dumps(e) + '\n' for e in examples)
    os.replace(tmp, os.path.join(out_dir, f'{split}.jsonl'))
    counts[split] = len(examples)
  return counts


def main(argv):
  del argv
  counts = write_corpus(FLAGS.out, FLAGS.eval_percent)
  print(f"Wrote {counts['train']} train and {counts['eval']} eval documents to {FLAGS.out}/")
  if FLAGS.sft_out:
    counts = write_instruction_task(FLAGS.out, FLAGS.sft_out, FLAGS.sft_train_examples,
                                    FLAGS.sft_eval_examples,
                                    train_questions_per_sentence=FLAGS.sft_questions_per_sentence)
    print(f"Wrote {counts['train']} train and {counts['eval']} held-out questions to {FLAGS.sft_out}/")
  if FLAGS.preference_out:
    counts = write_instruction_task(FLAGS.out, FLAGS.preference_out, FLAGS.preference_train_pairs,
                                    FLAGS.preference_eval_pairs, preference_pairs, seeds=(2, 3))
    print(f"Wrote {counts['train']} train and {counts['eval']} held-out preference pairs to "
          f"{FLAGS.preference_out}/")
  if FLAGS.grpo_out:
    # The training sentences' questions again (reinforcement learning on what instruction tuning saw),
    # and every question about every held-out sentence: over 1,000, so that a change of a point or two
    # in exact match is more than noise.
    counts = write_instruction_task(FLAGS.out, FLAGS.grpo_out, FLAGS.grpo_train_prompts,
                                    FLAGS.grpo_eval_prompts, seeds=(4, 1),
                                    train_questions_per_sentence=FLAGS.sft_questions_per_sentence,
                                    eval_questions_per_sentence=len(QUESTIONS))
    print(f"Wrote {counts['train']} train and {counts['eval']} held-out prompts to {FLAGS.grpo_out}/")


def _define_flags():
  """Only when run as a program: importing this module (tests do) must not define flags that another
  entry point also defines."""
  flags.DEFINE_string('out', 'demo/data', 'Output folder for train.jsonl and eval.jsonl.')
  flags.DEFINE_integer('eval_percent', 5, 'Share of documents held out for evaluation.', lower_bound=0,
                       upper_bound=99)
  flags.DEFINE_string('sft_out', '', 'If set, also write the instruction set here.')
  flags.DEFINE_integer('sft_train_examples', 30000,
                       'Training questions to write, at most (the demo corpus has ~7,650 training '
                       'sentences).', lower_bound=1)
  flags.DEFINE_integer('sft_questions_per_sentence', 3,
                       'Different questions asked about each training sentence (1 to 3): asked all '
                       'three, the model must read the question, not just recall the sentence.',
                       lower_bound=1, upper_bound=len(QUESTIONS))
  flags.DEFINE_integer('sft_eval_examples', 150, 'Held-out questions to write.', lower_bound=1)
  flags.DEFINE_string('preference_out', '', 'If set, also write preference pairs here.')
  flags.DEFINE_integer('preference_train_pairs', 3000, 'Training preference pairs to write.',
                       lower_bound=1)
  flags.DEFINE_integer('preference_eval_pairs', 150, 'Held-out preference pairs to write.',
                       lower_bound=1)
  flags.DEFINE_string('grpo_out', '', 'If set, also write prompts for reinforcement learning here.')
  flags.DEFINE_integer('grpo_train_prompts', 3000, 'Training prompts to write.', lower_bound=1)
  flags.DEFINE_integer('grpo_eval_prompts', 2000, 'Held-out questions to write, at most (every '
                       'question about each held-out sentence).', lower_bound=1)


if __name__ == '__main__':
  _define_flags()
  runtime.run(main)

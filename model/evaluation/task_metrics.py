"""Task metrics of generated answers: greedy answers to held-out prompts, scored against references.

Exact match and token F1 as SQuAD's evaluation script computes them (answers normalised: lower
case, punctuation and the articles a/an/the removed, whitespace collapsed; F1 as in its v2.0); ROUGE-1/2/L with
rouge-score (Porter stemmer, as lm-evaluation-harness and most papers use it); BLEU and chrF with
sacrebleu (its defaults: 13a tokenization, exponential smoothing; chrF2). SQuAD's normalisation turns a
reference such as "A" or "The" into nothing, which an empty answer then matches (exact match and F1 100):
`exact_match_strict` compares the answers as they are, stripped of surrounding whitespace only, and
`warn_empty_references` says how many references normalise to nothing. Every score is on sacrebleu's
0-100 scale: exact match, F1 and ROUGE are 100 x the mean over examples, BLEU and chrF are sacrebleu's
corpus scores (which are not means of sentence scores; per example, sentence BLEU with effective
order and sentence chrF are given). rouge-score's tokenizer keeps only a-z and 0-9, so answers in
other scripts get ROUGE 0: judge those by chrF.

Used by `python -m model.evaluate generate-metrics` and by train.sft's evaluations
(config.eval.generation). No TensorFlow; rouge-score and sacrebleu are imported when first used.
"""

import collections
import importlib
import re
import string
from typing import Sequence

import tqdm
from absl import logging

from model.inference.sampler import Generator, SamplingConfig

METRICS = ('exact_match', 'exact_match_strict', 'f1', 'rouge1', 'rouge2', 'rougeL', 'bleu', 'chrf')
# What is scored unless metrics are named: SQuAD's and the libraries' metrics, which people compare with.
DEFAULT_METRICS = tuple(m for m in METRICS if m != 'exact_match_strict')
# The metrics that SQuAD's normalisation can fool (an empty answer matches a reference such as "The").
NORMALISED = ('exact_match', 'f1')
_ROUGE = ('rouge1', 'rouge2', 'rougeL')
# The package each library metric needs (requirements-eval.txt installs them).
_PACKAGES = {'rouge1': 'rouge_score', 'rouge2': 'rouge_score', 'rougeL': 'rouge_score', 'bleu': 'sacrebleu',
             'chrf': 'sacrebleu'}
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
  """SQuAD v1.1's normalisation: lower case, no punctuation, no articles, single spaces."""
  text = ''.join(c for c in text.lower() if c not in _PUNCTUATION)
  return ' '.join(re.sub(r'\b(a|an|the)\b', ' ', text).split())


def exact_match(prediction: str, reference: str) -> float:
  return float(normalize_answer(prediction) == normalize_answer(reference))


def exact_match_strict(prediction: str, reference: str) -> float:
  """1 if the answers are equal after stripping surrounding whitespace (case, punctuation and articles
  count), else 0."""
  return float(prediction.strip() == reference.strip())


def empty_references(references: Sequence[str]) -> int:
  """How many references SQuAD's normalisation turns into the empty string ("The", "a", "", "!")."""
  return sum(not normalize_answer(r) for r in references)


def warn_empty_references(references: Sequence[str], metrics: Sequence[str], what: str) -> int:
  """Logs one warning, with the count, when `metrics` include exact_match or f1 and some of `references`
  (of the evaluation set `what`) normalise to nothing; returns that count."""
  count = empty_references(references) if any(m in NORMALISED for m in metrics) else 0
  if count:
    logging.warning(
        '%d of %d references of %s normalise to the empty string under SQuAD\'s normalisation (answers '
        'such as "A" or "The"): exact_match and f1 count an empty or article-only answer as right for '
        'them. exact_match_strict compares the answers stripped of surrounding whitespace only.',
        count, len(references), what)
  return count


def token_f1(prediction: str, reference: str) -> float:
  """F1 of the normalised answers' words (as multisets), as SQuAD v2.0's script computes it: v1.1's,
  except that two answers that both normalise to nothing ("a" and "The") match (1, not 0)."""
  predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
  if not predicted or not expected:
    return float(predicted == expected)
  same = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(predicted), same / len(expected)
  return 2 * precision * recall / (precision + recall)


def check_metrics(names: Sequence[str]) -> list[str]:
  """`names`, checked: known metrics, whose libraries are installed (before a run, not at its first
  evaluation)."""
  unknown = [n for n in names if n not in METRICS]
  if unknown or not names:
    raise ValueError(f'unknown task metric(s) {unknown}; choose among {", ".join(METRICS)}')
  for package in sorted({_PACKAGES[n] for n in names if n in _PACKAGES}):
    try:
      importlib.import_module(package)
    except ImportError:
      needing = ', '.join(n for n in names if _PACKAGES.get(n) == package)
      raise ValueError(f'task metric(s) {needing} need the {package} package, which is not installed: '
                       'pip install -r requirements-eval.txt') from None
  return list(names)


def score(predictions: Sequence[str], references: Sequence[str],
          metrics: Sequence[str] = DEFAULT_METRICS) -> tuple[dict[str, float], list[dict[str, float]]]:
  """(corpus scores, each example's scores) of `metrics` (names of METRICS), 0-100."""
  metrics = check_metrics(metrics)
  if len(predictions) != len(references) or not predictions:
    raise ValueError(f'need as many predictions as references, and some: got {len(predictions)} and '
                     f'{len(references)}')
  per_example = [{} for _ in predictions]
  corpus = {}
  pairs = list(zip(predictions, references))
  for name, fn in (('exact_match', exact_match), ('exact_match_strict', exact_match_strict),
                   ('f1', token_f1)):
    if name in metrics:
      for example, (p, r) in zip(per_example, pairs):
        example[name] = 100 * fn(p, r)
  rouge = [m for m in metrics if m in _ROUGE]
  if rouge:
    from rouge_score import rouge_scorer  # pylint: disable=import-outside-toplevel
    scorer = rouge_scorer.RougeScorer(rouge, use_stemmer=True)
    for example, (p, r) in zip(per_example, pairs):
      scores = scorer.score(r, p)  # the reference first
      example.update({m: 100.0 * scores[m].fmeasure for m in rouge})
  for name in ('exact_match', 'exact_match_strict', 'f1', *rouge):
    if name in metrics:
      corpus[name] = sum(e[name] for e in per_example) / len(per_example)
  if 'bleu' in metrics or 'chrf' in metrics:
    import sacrebleu  # pylint: disable=import-outside-toplevel
    streams = [list(references)]  # one reference stream
    if 'bleu' in metrics:
      corpus['bleu'] = sacrebleu.corpus_bleu(list(predictions), streams).score
      for example, (p, r) in zip(per_example, pairs):
        example['bleu'] = sacrebleu.sentence_bleu(p, [r]).score
    if 'chrf' in metrics:
      corpus['chrf'] = sacrebleu.corpus_chrf(list(predictions), streams).score
      for example, (p, r) in zip(per_example, pairs):
        example['chrf'] = sacrebleu.sentence_chrf(p, [r]).score
  return {m: corpus[m] for m in metrics}, [{m: e[m] for m in metrics} for e in per_example]


def prompts_and_references(template, conversations: Sequence[tuple[str, list[dict]]]
                           ) -> tuple[list[list[int]], list[str]]:
  """For (where, messages) ending with an assistant answer: the prompt ids (the conversation before
  the answer, with the template's generation prompt) and the answer."""
  prompts, references = [], []
  for where, messages in conversations:
    if not messages or messages[-1].get('role') != 'assistant':
      raise ValueError(f'{where}: a held-out conversation must end with the assistant answer to score')
    try:
      prompts.append(template.prompt_ids(messages[:-1]))
    except ValueError as e:  # data/chat.py's ChatFormatError
      raise ValueError(f'{where}: {e}') from None
    references.append(messages[-1]['content'])
  return prompts, references


def generate_answers(generator: Generator, tokenizer, prompts: Sequence[Sequence[int]],
                     stop_ids: Sequence[int], max_new_tokens: int = 32, batch_size: int = 32,
                     progress: bool | None = None) -> list[str]:
  """Greedy answers (decoded, stripped) to token-id prompts, `batch_size` at a time (the last batch
  filled with copies, so that every batch of a prompt length has one compiled program). Prompts too
  long for max_new_tokens more are cut from the left. `progress`: a bar of questions answered on
  stderr (None: only on a terminal)."""
  room = generator.config.max_seq_len - max_new_tokens
  prompts = [list(p)[-room:] for p in prompts]
  sampling = SamplingConfig(max_new_tokens=max_new_tokens, vocab_limit=tokenizer.vocab_size)
  answers = []
  with tqdm.tqdm(total=len(prompts), desc='Answering', unit='question',
                 disable=None if progress is None else not progress) as bar:
    for i in range(0, len(prompts), batch_size):
      batch = prompts[i:i + batch_size]
      outputs = generator.generate(batch + [batch[-1]] * (batch_size - len(batch)), sampling, stop_ids,
                                   tokenizer.pad_id)[:len(batch)]
      answers += [tokenizer.decode(o).strip() for o in outputs]
      bar.update(len(batch))
  return answers

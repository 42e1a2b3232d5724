"""Task metrics (model/evaluation/task_metrics.py) give the values of the libraries people report with, on fixed
strings: SQuAD's normalisation and F1 (as lm-evaluation-harness ships SQuAD v1.1's script), ROUGE from
rouge-score, BLEU and chrF from sacrebleu as lm-eval aggregates them."""

import logging
import sys

import pytest
import sacrebleu
from lm_eval.api import metrics as lm_eval_metrics
from lm_eval.tasks.qasper import metrics as squad_v1  # "Taken from the official evaluation script"
from rouge_score import rouge_scorer

from model.evaluation import task_metrics

pytestmark = [pytest.mark.unit, pytest.mark.parity]

PREDICTIONS = ['The cat sat on the mat.', 'Running dogs', 'Paris, France', '42', '',
               'the quick brown fox jumps over the lazy dog', 'a', 'Ça va très bien']
REFERENCES = ['the cat sat on a mat', 'run dog', 'Paris', '42', 'an answer',
              'a quick brown dog jumped over the lazy fox', 'The', 'ça va bien']


def test_exact_match_and_f1_are_squads():
  for p, r in zip(PREDICTIONS, REFERENCES):
    assert task_metrics.normalize_answer(p) == squad_v1.normalize_answer(p)
    assert task_metrics.exact_match(p, r) == float(squad_v1.normalize_answer(p) == squad_v1.normalize_answer(r))
    if squad_v1.normalize_answer(p) and squad_v1.normalize_answer(r):
      assert task_metrics.token_f1(p, r) == pytest.approx(squad_v1.f1_abstractive([p], [r]))
  assert task_metrics.normalize_answer(' The  Cat, sat!\n') == 'cat sat'
  # "a" and "The" both normalise to nothing: a match (SQuAD v2.0's F1; v1.1's would be 0).
  assert task_metrics.token_f1('a', 'The') == 1.0 and squad_v1.f1_abstractive(['a'], ['The']) == 0
  assert task_metrics.token_f1('', 'an answer') == 0.0
  # 5 predicted words (cat sat on the mat -> cat sat on mat), 4 shared of 4 reference words.
  assert task_metrics.token_f1('The cat sat on the mat.', 'a cat on a mat sat') == pytest.approx(1.0)
  assert task_metrics.token_f1('cat sat down', 'cat sat on mat') == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))


def test_rouge_bleu_and_chrf_are_the_libraries():
  corpus, per_example = task_metrics.score(PREDICTIONS, REFERENCES)
  assert list(corpus) == list(task_metrics.DEFAULT_METRICS) and len(per_example) == len(PREDICTIONS)
  scorer = rouge_scorer.RougeScorer(['rouge1', 'rouge2', 'rougeL'], use_stemmer=True)
  expected = [scorer.score(r, p) for p, r in zip(PREDICTIONS, REFERENCES)]
  for name in ('rouge1', 'rouge2', 'rougeL'):
    values = [100 * e[name].fmeasure for e in expected]
    assert [x[name] for x in per_example] == pytest.approx(values)
    assert corpus[name] == pytest.approx(sum(values) / len(values))
  assert per_example[1]['rouge1'] == 100.0  # stemmed: "Running dogs" is "run dog"
  # BLEU and chrF: sacrebleu's corpus scores, exactly as lm-eval's `bleu` / `chrf` aggregate them.
  items = list(zip(REFERENCES, PREDICTIONS))
  assert corpus['bleu'] == pytest.approx(lm_eval_metrics.bleu(items))
  assert corpus['chrf'] == pytest.approx(lm_eval_metrics.chrf(items))
  assert corpus['bleu'] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score)
  for p, r, example in zip(PREDICTIONS, REFERENCES, per_example):
    assert example['bleu'] == pytest.approx(sacrebleu.sentence_bleu(p, [r]).score)
    assert example['chrf'] == pytest.approx(sacrebleu.sentence_chrf(p, [r]).score)
  assert per_example[3] == pytest.approx({m: 100.0 for m in ('exact_match', 'f1', 'rouge1', 'rougeL', 'chrf',
                                                             'bleu')} | {'rouge2': 0.0})  # no bigram
  assert 0 < corpus['bleu'] < 100 and 0 < corpus['chrf'] < 100
  assert corpus['exact_match'] == pytest.approx(100 * 3 / 8)  # the cat sat on (a) mat, 42, a / The


def test_strict_exact_match_does_not_count_an_empty_answer_to_the_as_right(caplog):
  """SQuAD's exact match and F1 stay as they are: "" matches "The" (both normalise to nothing). The
  strict metric compares the answers stripped of surrounding whitespace, and the references that
  normalise to nothing are counted in one warning."""
  assert task_metrics.exact_match('', 'The') == task_metrics.token_f1('', 'A') == 1.0  # SQuAD's, kept
  assert task_metrics.exact_match_strict('', 'The') == 0.0
  assert task_metrics.exact_match_strict(' The\n', 'The') == 1.0
  assert task_metrics.exact_match_strict('the', 'The') == task_metrics.exact_match_strict('Paris.', 'Paris') == 0.0
  predictions, references = ['', 'a', 'Paris', 'paris'], ['The', 'A', 'Paris', 'Paris']
  corpus, per_example = task_metrics.score(predictions, references, ['exact_match', 'exact_match_strict'])
  assert corpus == {'exact_match': 100.0, 'exact_match_strict': 25.0}
  assert [e['exact_match_strict'] for e in per_example] == [0.0, 0.0, 100.0, 0.0]
  assert 'exact_match_strict' in task_metrics.METRICS
  assert task_metrics.check_metrics(['exact_match_strict']) == ['exact_match_strict']
  assert task_metrics.empty_references(references + ['', '!', 'an answer']) == 4
  with caplog.at_level(logging.WARNING):
    assert task_metrics.warn_empty_references(references, ['exact_match'], 'heldout.jsonl') == 2
    assert task_metrics.warn_empty_references(references, ['exact_match_strict', 'rougeL'], 'x') == 0
  [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert warning.startswith('2 of 4 references of heldout.jsonl normalise to the empty string')
  assert 'exact_match_strict' in warning


def test_a_metric_whose_library_is_missing_is_named_before_scoring(monkeypatch):
  monkeypatch.setitem(sys.modules, 'sacrebleu', None)  # makes `import sacrebleu` fail
  with pytest.raises(ValueError, match='task metric.s. bleu, chrf need the sacrebleu package, which is not '
                     'installed: pip install -r requirements-eval.txt'):
    task_metrics.check_metrics(['exact_match', 'bleu', 'chrf'])
  assert task_metrics.check_metrics(['exact_match', 'rougeL']) == ['exact_match', 'rougeL']

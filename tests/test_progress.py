"""Progress bars (rate and ETA) of the long jobs that are not training steps: on a terminal only.

stderr is replaced by a stream that says it is a terminal, which is what tqdm checks. Without it,
the same calls must print no bar, so that logs and CI output stay clean."""

import contextlib
import io
import json
import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pydoc_data import topics

from data import demo_corpus
from data import tokenizer as tokenizer_lib
from model import Transformer, convert
from model.config import preset
from model.evaluation import task_metrics
from model.weights import params as params_lib

pytestmark = pytest.mark.unit


class _Terminal(io.StringIO):
  def isatty(self):
    return True


@contextlib.contextmanager
def terminal():
  """stderr is a terminal inside the block. (Not a fixture: pytest's output capture would put its
  own stderr back between fixture setup and the test.)"""
  stream, saved = _Terminal(), sys.stderr
  sys.stderr = stream
  try:
    yield stream
  finally:
    sys.stderr = saved


def _final_bar(text: str, desc: str) -> str:
  """The last state of the bar `desc` (tqdm redraws it after carriage returns)."""
  states = [s for s in re.split(r'[\r\n]', text) if s.startswith(desc)]
  assert states, f'no {desc!r} bar in {text!r}'
  assert re.search(r'\[\d+:\d\d<\d+:\d\d, ', states[-1]), f'no elapsed<ETA in {states[-1]!r}'
  return states[-1]


def test_demo_corpus_shows_sources_read(tmp_path):
  with terminal() as stream:
    counts = demo_corpus.write_corpus(str(tmp_path))
  bar = _final_bar(stream.getvalue(), 'Writing the demo corpus')
  total = len(demo_corpus.stdlib_files()) + len(topics.topics)
  assert '100%' in bar and f'{total}/{total}' in bar and 'source/s' in bar
  assert f'documents={counts["train"] + counts["eval"]}' in bar


def test_tokenizer_cli_shows_corpus_read(tmp_path):
  path = tmp_path / 'corpus.jsonl'
  docs = [f'document number {i} ' * 20 for i in range(50)]
  path.write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs))
  with terminal() as stream:
    assert list(tokenizer_lib._reading_progress(iter(docs), [str(path)], 0)) == docs
  bar = _final_bar(stream.getvalue(), 'Reading the corpus')
  assert '100%' in bar and 'char/s' in bar


class _Tokenizer:
  pad_id, vocab_size = 0, 10

  def decode(self, ids):
    return 'yes'


class _Generator:
  config = preset('tiny')

  def generate(self, prompts, sampling, stop_ids, pad_id):
    return [[7]] * len(prompts)


PROMPTS = [[1, 5, 6]] * 5


def test_answering_shows_questions_answered():
  with terminal() as stream:
    answers = task_metrics.generate_answers(_Generator(), _Tokenizer(), PROMPTS, [2], batch_size=2)
  assert answers == ['yes'] * 5
  bar = _final_bar(stream.getvalue(), 'Answering')
  assert '100%' in bar and '5/5' in bar and 'question/s' in bar


def test_no_bar_when_stderr_is_not_a_terminal(capsys):
  task_metrics.generate_answers(_Generator(), _Tokenizer(), PROMPTS, [2])
  assert capsys.readouterr().err == ''


def test_convert_shows_tensors_exported_and_imported(tmp_path, capsys):
  cfg = preset('tiny', n_layers=2, vocab_size=256, dtype='float32')
  params = nn.meta.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params'])
  params_lib.save_params(str(tmp_path / 'ckpt' / 'checkpoints'), cfg, jax.tree.map(np.asarray, params))
  n_tensors = 3 + 9 * cfg.n_layers  # embed, final norm, lm head; 9 per layer
  with terminal() as stream:
    convert.export_hf(str(tmp_path / 'ckpt'), str(tmp_path / 'hf'), dtype='float32', log=print)
    convert.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'back'), log=print)
  for desc in ('Exporting tensors', 'Importing tensors'):
    bar = _final_bar(stream.getvalue(), desc)
    assert '100%' in bar and f'{n_tensors}/{n_tensors}' in bar and 'tensor/s' in bar
  assert 'Wrote' in capsys.readouterr().out  # the log lines still come, around the bar
  # A silent conversion (log=None, as the library tests call it) draws no bar either.
  with terminal() as stream:
    convert.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'quiet'), log=None)
  assert 'Importing tensors' not in stream.getvalue()

"""Shows what the train step will be fed: the first rows of a config's input pipeline, decoded for a
person, and what they hold.

  python -m data.inspect --config=configs/tiny.py [--config.data.train_files=...] [--rows 4]
  python -m data.inspect --config=configs/sft_tiny.py --split=eval --max_chars=0

The same `--config` (and `--config.a.b=v` overrides) as the trainers; `data.format` picks the
pretraining or the instruction-tuning pipeline. Each row is listed segment by segment (a segment is
a document or example packed into the row, or the part of one that fits; attention stays within
it), with its source for mixtures. Text the model learns to produce (the targets with loss weight 1)
is «between guillemets»; control tokens (BOS, EOS, chat template markers) appear as themselves. A
summary over `--summary_rows` rows follows: token counts, padding share, documents (segments) per
row, the share of tokens with loss weight, and for mixtures each source's share of tokens beside its
weight.
"""

import os

# Before TensorFlow loads (data.iterator imports it): its C++ log level is read once, then. Errors
# only: TensorFlow would otherwise log a bad record's Python traceback before the one-line error.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # pylint: disable=wrong-import-position
from absl import app, flags  # pylint: disable=wrong-import-position

from data.config import SFT_FORMATS  # pylint: disable=wrong-import-position
from data.iterator import DatasetIterator  # pylint: disable=wrong-import-position
import runtime  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS  # defined by define_flags() when run as a program

LEARNED = ('«', '»')


def make_data(config):
  """The pipeline the trainers would build from `config` (pretraining or instruction tuning)."""
  if config.data.format == 'synthetic':
    raise ValueError('config.data.format is "synthetic": random tokens, nothing to inspect')
  if config.data.format in SFT_FORMATS:
    from data.sft import SFTData  # pylint: disable=import-outside-toplevel
    return SFTData(config.data, config.train.seq_len)
  from data.pretrain import PretrainData  # pylint: disable=import-outside-toplevel
  return PretrainData(config.data, config.train.seq_len)


def first_rows(data, split: str, n: int) -> dict[str, np.ndarray]:
  """The first `n` rows (or all, if fewer) of host 0 of 1, batch keys [n, T] plus a mixture's
  per-row `source`."""
  if split == 'eval' and not data.has_eval():
    raise ValueError('this config has no eval data (config.data.eval_files)')
  iterator = DatasetIterator(data.dataset(split, 0, 1, min(n, 64)))
  batches, count = [], 0
  for batch in iterator:
    batches.append(batch)
    count += len(batch['inputs'])
    if count >= n:
      break
  iterator.close()
  return {k: np.concatenate([b[k] for b in batches])[:n] for k in batches[0] if k != 'source_tokens'}


def _pieces(tokenizer, ids: list[int], learned: np.ndarray, controls: dict[int, str]):
  """(text, learned) runs of a segment: consecutive tokens alike, each control token a run of its own.
  A run's text is what it adds to the decoded segment so far, so that spaces and characters spanning
  runs come out as in the whole text."""
  cuts = [i for i in range(1, len(ids)) if learned[i] != learned[i - 1] or ids[i] in controls
          or ids[i - 1] in controls] + [len(ids)]
  runs, start, decoded = [], 0, ''
  for end in cuts:
    if end - start == 1 and ids[start] in controls:
      runs.append((controls[ids[start]], bool(learned[start])))
    else:
      prefix = tokenizer.decode(ids[:end])
      text = prefix[len(decoded):] if prefix.startswith(decoded) else tokenizer.decode(ids[start:end])
      runs.append((text, bool(learned[start])))
      decoded = prefix
    start = end
  return runs


def _render(runs, max_chars: int) -> str:
  """Runs as one line of text, learned ones between guillemets; past `max_chars`, the middle is left
  out."""
  text = ''.join(t for t, _ in runs)
  learned = np.concatenate([np.full(len(t), l) for t, l in runs] + [np.zeros(0, bool)])
  parts = [(text, learned)]
  if max_chars and len(text) > max_chars:
    head, tail = max_chars // 2, max_chars - max_chars // 2
    parts = [(text[:head], learned[:head]), (f' …[{len(text) - max_chars:,} characters]… ', None),
             (text[len(text) - tail:], learned[len(text) - tail:])]
  out = []
  for part, marks in parts:
    if marks is None:
      out.append(part)
      continue
    edges = [0, *(np.flatnonzero(np.diff(marks.astype(np.int8))) + 1), len(part)]
    for begin, end in zip(edges[:-1], edges[1:]):
      if end > begin:
        out.append(f'{LEARNED[0]}{part[begin:end]}{LEARNED[1]}' if marks[begin] else part[begin:end])
  return ''.join(out).replace('\n', '\n      ')


def describe(rows: dict[str, np.ndarray], tokenizer, source_names=(), weights=(), show: int = 4,
             max_chars: int = 600) -> str:
  """The first `show` rows decoded, then a summary of all `rows`."""
  controls = tokenizer.control_tokens()
  n, seq_len = rows['inputs'].shape
  real = rows['segment_ids'] > 0
  # The token at position p is learned when the target at p - 1 (that token) has loss weight.
  learned = np.concatenate([np.zeros((n, 1)), rows['loss_weights'][:, :-1]], axis=1) > 0
  segments = [len(np.unique(s[s > 0])) for s in rows['segment_ids']]
  sources = rows.get('source')
  lines = [f'Legend: {LEARNED[0]}text{LEARNED[1]} is learned (loss weight 1); each "[k]" line is '
           'segment k of the row: a document or example, or the part of one that fits.']
  for r in range(min(show, n)):
    head = (f'row {r}: {int(real[r].sum()):,} tokens, {seq_len - int(real[r].sum()):,} padding, '
            f'{segments[r]} segment(s), {int(learned[r].sum()):,} learned')
    if sources is not None:
      head += f'; source {source_names[sources[r]]}'
    lines.append(head)
    for s in np.unique(rows['segment_ids'][r][real[r]]):
      at = np.flatnonzero(rows['segment_ids'][r] == s)
      runs = _pieces(tokenizer, rows['inputs'][r][at].tolist(), learned[r][at], controls)
      lines.append(f'  [{s}] {_render(runs, max_chars)}')
  total_real = int(real.sum())
  lines += [
      f'Summary of {n} rows of {seq_len} tokens: {total_real:,} tokens, '
      f'{100 * (1 - total_real / (n * seq_len)):.1f}% padding; documents (segments) per row: '
      f'{np.mean(segments):.1f} on average (min {min(segments)}, max {max(segments)}); '
      f'{100 * learned.sum() / max(total_real, 1):.1f}% of tokens learned']
  if sources is not None:
    for i, name in enumerate(source_names):
      tokens = int(real[sources == i].sum())
      lines.append(f'  source {name}: {100 * tokens / max(total_real, 1):.1f}% of tokens '
                   f'(weight {100 * weights[i]:.1f}%), {int((sources == i).sum())} rows')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  data = make_data(FLAGS.config)
  rows = first_rows(data, FLAGS.split, max(FLAGS.rows, FLAGS.summary_rows))
  names = [s.name for s in data.sources] if FLAGS.config.data.mixture else ()
  print(describe(rows, data.tokenizer, names, [s.weight for s in data.sources], FLAGS.rows,
                 FLAGS.max_chars))


def define_flags():
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file('config', None, 'Path to a config file (optionally :options), as '
                                  'for train.pretrain / train.sft.')
  flags.mark_flag_as_required('config')
  flags.DEFINE_enum('split', 'train', ['train', 'eval'], 'Which pipeline: training or held-out rows.')
  flags.DEFINE_integer('rows', 4, 'Rows to show.')
  flags.DEFINE_integer('summary_rows', 200, 'Rows the summary counts (at least --rows).')
  flags.DEFINE_integer('max_chars', 600, 'Characters shown per segment (the middle is left out); '
                       '0: all.')


if __name__ == '__main__':
  define_flags()
  runtime.run(main)

"""Pretraining entry point.

  python -m train.pretrain --config=configs/tiny.py --workdir=runs/tiny [--config.train.steps=100 ...]
"""

from absl import app, flags
from ml_collections import config_flags

from data.synthetic import SyntheticData
from train import loop

FLAGS = flags.FLAGS  # defined by _define_flags() when run as a program


def make_data(config):
  if config.data.format == 'synthetic':
    return SyntheticData(config.data.seed, config.train.seq_len, config.model.vocab_size)
  from data.pretrain import PretrainData  # pylint: disable=import-outside-toplevel  (TensorFlow)
  return PretrainData(config.data, config.train.seq_len)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  loop.train(config, FLAGS.workdir, make_data(config))


def _define_flags():
  """Only when run as a program: importing this module (tests do) must not define flags that another
  entry point also defines."""
  config_flags.DEFINE_config_file('config', None, 'Path to a config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Checkpoints, logs and metrics go here; a run resumes '
                      'from the latest checkpoint in it.', required=True)


if __name__ == '__main__':
  _define_flags()
  flags.mark_flags_as_required(['config'])
  app.run(main)

"""Pretraining entry point.

  python -m train.pretrain --config=configs/tiny.py --workdir=runs/tiny [--config.train.steps=100 ...]
"""

from absl import app, flags

from data.synthetic import SyntheticData
from train import host_memory, loop

FLAGS = flags.FLAGS  # --config and --workdir: loop.define_flags(), when run as a program


def make_data(config):
  if config.data.format == 'synthetic':
    return SyntheticData(config.data.seed, config.train.seq_len, config.model.vocab_size)
  from data.pretrain import PretrainData  # pylint: disable=import-outside-toplevel  (TensorFlow)
  return PretrainData(config.data, config.train.seq_len)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  host_memory.keep_freed_memory()  # before JAX starts its CPU backend
  config = FLAGS.config
  loop.train(config, FLAGS.workdir, make_data(config))


if __name__ == '__main__':
  loop.define_flags()
  app.run(main)

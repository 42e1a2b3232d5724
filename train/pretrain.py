"""Pretraining entry point.

  python -m train.pretrain --config=configs/tiny.py --workdir=runs/tiny [--config.train.steps=100 ...]

With `--config.init_from` (a checkpoint or an imported Hugging Face model) pretraining continues from
those parameters, e.g. with LoRA (`--config.lora.rank=16`) on new text.
"""

from absl import flags

from data.synthetic import SyntheticData
import runtime
from train import loop, run

FLAGS = flags.FLAGS  # --config and --workdir: run.define_flags(), when run as a program


def make_data(config):
  if config.data.format == 'synthetic':
    return SyntheticData(config.data.seed, config.train.seq_len, config.model.vocab_size)
  from data.pretrain import PretrainData  # pylint: disable=import-outside-toplevel  (TensorFlow)
  return PretrainData(config.data, config.train.seq_len)


def main(argv):
  runtime.no_positional_arguments(argv)
  config = FLAGS.config
  runtime.setup(config.distributed)
  loop.train(config, FLAGS.workdir, lambda: make_data(config))


if __name__ == '__main__':
  run.define_flags()
  runtime.run(main)

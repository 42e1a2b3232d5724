"""Instruction-tuning entry point: the pretraining loop and train step, fed instruction data.

  python -m train.sft --config=configs/sft_tiny.py --workdir=runs/sft --config.init_from=runs/tiny

`init_from` (a workdir, its checkpoints/ folder, a step folder, or an imported Hugging Face model) gives
the starting parameters; the optimizer starts fresh. An existing checkpoint in `--workdir` wins, so a
restarted job resumes where it stopped.
"""

from absl import flags, logging

import runtime
from train import loop, run

FLAGS = flags.FLAGS  # --config and --workdir: run.define_flags(), when run as a program


def main(argv):
  runtime.no_positional_arguments(argv)
  config = FLAGS.config
  runtime.setup(config.distributed)
  if not config.init_from:
    logging.warning('config.init_from is empty: instruction tuning starts from random parameters')
  from data.sft import SFTData  # pylint: disable=import-outside-toplevel  (TensorFlow)
  loop.train(config, FLAGS.workdir, lambda: SFTData(config.data, config.train.seq_len))


if __name__ == '__main__':
  run.define_flags()
  runtime.run(main)

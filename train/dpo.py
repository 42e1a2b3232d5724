"""Preference-tuning entry point (DPO, robust DPO, IPO, SimPO): the loop and train step of pretraining and
instruction tuning, with the preference objective (train/step.py `Preference`), fed preference pairs.

  python -m train.dpo --config=configs/dpo_tiny.py --workdir=runs/dpo --config.init_from=runs/sft

`init_from` is the model to align, usually an instruction-tuned one: the policy starts from it and the
reference model is it, frozen (with LoRA, the base with the adapters off: no second copy of the
weights). The reference's log-probabilities of every pair's completions are computed either once,
before training, by a forward pass over the training and held-out pairs (`dpo.reference='precompute'`,
the default; train/reference_pass.py) and kept in <workdir>/reference_logps.json by pair, so that a
resumed run, whose data position says which pairs come next, reads them instead of computing them
again; or in every step (`dpo.reference='step'`). docs/benchmarks.md has what each costs. SimPO needs no
reference. The run is assembled as every other (train/loop.py `train`).
"""

from absl import flags

import runtime
from train import loop, run, validate

FLAGS = flags.FLAGS  # --config and --workdir: run.define_flags(), when run as a program


def train(config, workdir: str, data=None) -> dict[str, float]:
  """Preference-tunes config.init_from on `data` (default: the PreferenceData of config.data) in
  `workdir`, resuming it if it holds checkpoints; returns the last logged metrics."""
  if validate.objective(config) != 'dpo':
    raise validate.ConfigError(f'train.dpo trains the preference objective: config.train.objective '
                               f'must be "dpo", got {validate.objective(config)!r}')
  if not config.init_from:
    raise validate.ConfigError('train.dpo aligns a trained model: set config.init_from to it (a '
                               'checkpoint, usually of instruction tuning, or an imported Hugging Face '
                               'model)')

  def make_data():  # by loop.train once the workdir is locked and its config checked (unless finished)
    if data is not None:
      return data
    from data.preference import PreferenceData  # pylint: disable=import-outside-toplevel  (TensorFlow)
    return PreferenceData(config.data, config.train.seq_len)

  return loop.train(config, workdir, make_data)


def main(argv):
  runtime.no_positional_arguments(argv)
  config = FLAGS.config
  runtime.setup(config.distributed)
  train(config, FLAGS.workdir)


if __name__ == '__main__':
  run.define_flags()
  runtime.run(main)

"""Instruction-tuning entry point: the pretraining loop and train step, fed instruction data.

  python -m train.sft --config=configs/sft_tiny.py --workdir=runs/sft --config.init_from=runs/tiny

`init_from` (a workdir, its checkpoints/ folder, a step folder, or an imported Hugging Face model) gives
the starting parameters; the optimizer starts fresh. An existing checkpoint in `--workdir` wins, so a
restarted job resumes where it stopped.
"""

from absl import app, flags, logging

from train import checkpoint, host_memory, loop, validate

FLAGS = flags.FLAGS  # --config and --workdir: loop.define_flags(), when run as a program

# Fields that must agree between the checkpoint and config.model: they change what the weights mean.
ARCHITECTURE_FIELDS = ('vocab_size', 'embed_dim', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim',
                       'mlp_dim', 'norm_eps', 'rope_theta', 'rope_scaling_factor', 'rope_low_freq_factor',
                       'rope_high_freq_factor', 'rope_original_max_len', 'qkv_bias', 'tie_embeddings')


def params_from_checkpoint(path: str):
  """`init_params` for loop.train: the parameters of checkpoint `path`, checked against the config."""
  def init_params(run: loop.Run):
    abstract = run.abstract_state().params
    saved = checkpoint.load_model_config(path)
    different = [f'model.{f}: checkpoint {getattr(saved, f)!r}, config {getattr(run.model_config, f)!r}'
                 for f in ARCHITECTURE_FIELDS if getattr(saved, f) != getattr(run.model_config, f)]
    if different:
      try:
        checkpoint.check_params_match(path, abstract)
        shapes = ''
      except ValueError as e:
        shapes = f'\n{e}'
      raise validate.ConfigError(f'config.init_from={path} was trained with a different model:\n  '
                                 + '\n  '.join(different) + shapes)
    logging.info('Initialising parameters from %s', checkpoint.resolve_step_dir(path))
    return checkpoint.load_params(path, abstract)
  return init_params


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  host_memory.keep_freed_memory()  # before JAX starts its CPU backend
  config = FLAGS.config
  if not config.init_from:
    logging.warning('config.init_from is empty: instruction tuning starts from random parameters')
  init = params_from_checkpoint(config.init_from) if config.init_from else None
  from data.sft import SFTData  # pylint: disable=import-outside-toplevel  (TensorFlow)
  loop.train(config, FLAGS.workdir, SFTData(config.data, config.train.seq_len), init_params=init)


if __name__ == '__main__':
  loop.define_flags()
  app.run(main)

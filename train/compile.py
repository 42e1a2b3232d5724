"""`python -m train.compile`: compiles the real train steps for a TPU slice from any machine, and says
whether they fit in HBM.

  python -m train.compile --config=configs/llama2_7b.py:v5p-8 --topology=v5p-8 [--config.key=value ...]

When the config file has an SFT variant (`get_config('...,sft')`, e.g. configs/llama2_7b.py), its step
is compiled too, with the same command-line overrides; a preference-tuning config (option `dpo`, e.g.
`configs/llama3_8b.py:v5p-8,dpo`) compiles its DPO step alone, a reinforcement-learning one (`,grpo`) its
train step and its rollout program (sampling from the parameters on the same chips). Per chip, the compiler's memory figures
(arguments, outputs, temporaries) are printed against the chip's HBM (train/topology.py); a step that
does not fit exits with status 1 and a message naming the settings to change.
"""

import os
import sys

import jax
from absl import flags
from ml_collections import config_flags

import runtime
from train import run, topology

FLAGS = flags.FLAGS


def main(argv):
  runtime.no_positional_arguments(argv)
  runtime.setup(keep_freed_memory=False)
  config_flag = FLAGS['config']
  path = config_flags.get_config_filename(config_flag)
  overrides = config_flags.get_override_values(config_flag)
  with runtime.flag_error('topology'):
    slice_ = topology.parse_topology(FLAGS.topology)
  configs = [(topology.step_name(config_flag.value), path, config_flag.value)]
  sft = topology.sft_variant(path) if FLAGS.sft else None
  if sft:
    sft_config = topology.load_config(sft)
    sft_config.update_from_flattened_dict(overrides)
    configs.append(('SFT step', sft, sft_config))

  if config_flag.value.train.get('objective', 'lm') == 'grpo':
    configs.append(('GRPO rollout', path, config_flag.value))

  failed = False
  for name, source, config in configs:
    print(f'Compiling the {name} of {source} for {slice_.name} ...', flush=True)
    report = (topology.compile_rollout(config, slice_) if name == 'GRPO rollout' else
              topology.compile_step(config, slice_, name))
    print(report.summary(), flush=True)
    if not report.fits:
      failed = True
      print(f'\nThe {name} does not fit in {slice_.chip.hbm_gib:g} GiB per chip. Try:\n'
            + topology.slice_tip(source, slice_) + topology.advice(report, config), file=sys.stderr,
            flush=True)
  if failed:
    sys.exit(1)


def define_flags():
  run.define_flags(workdir=False, lock_config=False)
  flags.DEFINE_string('topology', None, 'TPU slice: v5p-8, v4-8, v5e-8, v6e-8, ... or v5p:2x2x1.',
                      required=True)
  flags.DEFINE_bool('sft', True, 'Also compile the config\'s SFT variant, when it has one.')


if __name__ == '__main__':
  # Before JAX starts a backend: compiling needs no TPU, and takes none on a TPU VM that is busy.
  if 'JAX_PLATFORMS' not in os.environ:
    jax.config.update('jax_platforms', 'cpu')
  define_flags()
  runtime.run(main)

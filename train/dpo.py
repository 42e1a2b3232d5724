"""Preference-tuning entry point (DPO, robust DPO, IPO, SimPO): the loop and train step of pretraining and
instruction tuning, with the preference objective (train/step.py `Preference`), fed preference pairs.

  python -m train.dpo --config=configs/dpo_tiny.py --workdir=runs/dpo --config.init_from=runs/sft

`init_from` is the model to align, usually an instruction-tuned one: the policy starts from it and the
reference model is it, frozen (with LoRA, the base with the adapters off: no second copy of the
weights). The reference's log-probabilities of every pair's completions are computed either once,
before training, by a forward pass over the training and held-out pairs (`dpo.reference='precompute'`,
the default) and kept in <workdir>/reference_logps.json by pair, so that a resumed run, whose data
position says which pairs come next, reads them instead of computing them again; or in every step
(`dpo.reference='step'`). docs/benchmarks.md has what each costs. SimPO needs no reference.
"""

import json
import os
import time

import jax
import numpy as np
from absl import flags, logging
from etils import epath
from jax.experimental import multihost_utils

from data.batch import empty_like
from model import lora as lora_lib
from model.weights import params as params_lib
import runtime
from train import batches as batches_lib
from train import checkpoint, loop, run, validate
from train import workdir as workdir_lib
from train.step import REFERENCE_FREE

FLAGS = flags.FLAGS  # --config and --workdir: run.define_flags(), when run as a program

REFERENCE_LOGPS = 'reference_logps.json'  # in the workdir


def _in_lockstep(batches):
  """`batches`, with every host stepping together: a host that has run out feeds empty batches until
  all have (the reference pass is one collective computation)."""
  batches, last = iter(batches), None
  while True:
    batch = next(batches, None)
    more = batch is not None
    if jax.process_count() > 1:
      more = bool(np.any(multihost_utils.process_allgather(np.array(more))))
    if not more:
      return
    last = batch if batch is not None else empty_like(last)
    yield last


def reference_logps(trainer_run: run.Run, start: checkpoint.Start, data) -> np.ndarray:
  """[pairs, 2]: the log-probability of each pair's chosen and rejected completion under the starting
  model (`start`), for the training pairs then the held-out ones (PreferenceData's `example_ids`)."""
  with_adapters = trainer_run.lora.enabled and start.params is not None
  if not trainer_run.lora.enabled:
    params = start.params
  else:
    params = lora_lib.join(start.frozen, start.params) if with_adapters else start.frozen
  step = trainer_run.reference_step(with_adapters)
  shard_index, shard_count, local = batches_lib.data_shard(trainer_run.batch_sharding,
                                                           trainer_run.config.train.batch_size)
  table = np.full((len(data.train_pairs) + len(data.eval_pairs), 2), np.nan, np.float32)
  begin = time.perf_counter()
  for split in ('train_pass', 'eval'):
    for batch in _in_lockstep(data.ordered_batches(split, shard_index, shard_count, local)):
      logps, ids = jax.device_get(step(params, trainer_run.global_batch(batch)))
      found = ids >= 0
      table[ids[found]] = logps[found]
  missing = int(np.isnan(table).any(axis=1).sum())
  if missing:
    raise RuntimeError(f'the reference pass left {missing} pair(s) without log-probabilities')
  logging.info('Reference log-probabilities of %d pairs computed in %.1f s', len(table),
               time.perf_counter() - begin)
  return table


def _same_path(a, b) -> bool:
  return str(epath.Path(str(a))) == str(epath.Path(str(b)))  # 'demo/sft/' is 'demo/sft'


def prepare_reference(config, workdir: str, data, init_params):
  """Gives `data` the reference log-probabilities of its pairs: from the workdir, or computed from the
  starting model (then saved). A resumed run whose pairs changed computes them again from the model it
  started from, and refuses another config.init_from. Returns the `init_params` for the loop: the start
  already loaded for the pass, when the run is fresh."""
  path = epath.Path(workdir) / REFERENCE_LOGPS
  fingerprint = data.fingerprint()
  resuming = bool(params_lib.saved_steps(os.path.join(workdir, 'checkpoints')))
  if path.exists():
    saved = json.loads(path.read_text())
    same_pairs = saved['fingerprint'] == fingerprint
    same_start = _same_path(saved.get('init_from', ''), config.init_from)
    if same_pairs and (resuming or same_start):
      # Resuming, the reference is the model the run started from, whatever path init_from now gives.
      logging.info('Reference log-probabilities of %d pairs read from %s', len(saved['logps']), path)
      data.set_reference(np.asarray(saved['logps'], np.float32))
      return init_params
    if resuming and not same_start:
      raise validate.ConfigError(
          f'{path} holds the reference log-probabilities of the model this run started from, '
          f'config.init_from={saved.get("init_from")}; the preference pairs have changed since, and their '
          f'reference must be that model too, not config.init_from={config.init_from}: resume with '
          f'--config.init_from={saved.get("init_from")}, or use a new --workdir')
    logging.warning('%s was computed for %s; computing them again from config.init_from=%s', path,
                    'other preference pairs (the data changed)' if not same_pairs else
                    f'another starting model ({saved.get("init_from")})', config.init_from)
  trainer_run = run.Run(config, tokenizer_vocab=data.vocab_size)
  start = init_params(trainer_run)
  table = reference_logps(trainer_run, start, data)
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    workdir_lib.write_text(path, json.dumps({'fingerprint': fingerprint, 'init_from': str(config.init_from),
                                             'logps': table.tolist()}))
  data.set_reference(table)
  if resuming:
    return init_params
  return lambda _: start


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
  if (config.lora.rank and config.dpo.reference == 'step'
      and params_lib.load_lora_reference(config.init_from) is not None):
    raise validate.ConfigError(
        f'config.init_from={config.init_from} holds LoRA adapters; with dpo.reference=step the '
        'reference is the base alone, not that starting model: set config.dpo.reference=precompute '
        '(the reference is then the base with those adapters), or merge them into the base first')
  init = checkpoint.params_from(config.init_from)

  def make_data():  # by loop.train once the workdir is locked and its config checked (unless finished)
    nonlocal init
    pairs = data
    if pairs is None:
      from data.preference import PreferenceData  # pylint: disable=import-outside-toplevel  (TensorFlow)
      pairs = PreferenceData(config.data, config.train.seq_len)
    if config.dpo.reference == 'precompute' and config.dpo.loss not in REFERENCE_FREE:
      init = prepare_reference(config, workdir, pairs, init)  # a fresh run reuses the start it loaded
    return pairs

  return loop.train(config, workdir, make_data, init_params=lambda r: init(r))


def main(argv):
  runtime.no_positional_arguments(argv)
  config = FLAGS.config
  runtime.setup(config.distributed)
  train(config, FLAGS.workdir)


if __name__ == '__main__':
  run.define_flags()
  runtime.run(main)

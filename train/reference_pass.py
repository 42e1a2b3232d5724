"""The reference pass of preference tuning, and the join of its table to the batches.

With `dpo.reference='precompute'` (train/dpo.py) the reference model's log-probabilities of every pair's
chosen and rejected completion are computed once, by a forward pass over the training and held-out
pairs, a step of its own in loop.train: after the start is resolved (train/start.py, whose starting
model is the reference) and before the Trainer is built. The table ([pairs, 2], in the order of the
pairs' index, `example_ids`: training pairs, then held-out ones) is kept in
<workdir>/reference_logps.json with a fingerprint of the pairs and the init_from it was computed from,
so that a resumed run reads it instead of computing it again.

The data only marks each pair of a batch with its index (data/preference.py); `join` (and `Joined`, for
the training iterator) turns that into what the step takes: the pair's reference log-probabilities as
`ref_logps` (data/batch.py), or, with the reference in the step or none (SimPO), nothing. The training
iterator's position (in the checkpoint) says which pairs come next, so a resumed run joins the same
values to the same batches.
"""

import json
import time
from typing import Any, Iterator

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from data.batch import empty_like
from train import batches as batches_lib
from train import start as start_lib
from train import validate
from train import workdir as workdir_lib

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


def compute(run, data, params, with_adapters: bool = False) -> np.ndarray:
  """[pairs, 2]: the log-probability of each pair's chosen and rejected completion under the model of
  `params` (start.starting_model's: with LoRA the base, or the base joined with adapters,
  `with_adapters`), for the training pairs then the held-out ones (the pairs' `example_ids`)."""
  step = run.reference_step(with_adapters)
  shard_index, shard_count, local = batches_lib.data_shard(run.batch_sharding,
                                                           run.config.train.batch_size)
  out = np.full((len(data.train_pairs) + len(data.eval_pairs), 2), np.nan, np.float32)
  begin = time.perf_counter()
  for split in ('train_pass', 'eval'):
    for batch in _in_lockstep(data.ordered_batches(split, shard_index, shard_count, local)):
      logps, ids = jax.device_get(step(params, run.global_batch(batch)))
      found = ids >= 0
      out[ids[found]] = logps[found]
  missing = int(np.isnan(out).any(axis=1).sum())
  if missing:
    raise RuntimeError(f'the reference pass left {missing} pair(s) without log-probabilities')
  logging.info('Reference log-probabilities of %d pairs computed in %.1f s', len(out),
               time.perf_counter() - begin)
  return out


def _same_path(a, b) -> bool:
  return str(epath.Path(str(a))) == str(epath.Path(str(b)))  # 'demo/sft/' is 'demo/sft'


def table(run, config: Any, workdir: str, start: start_lib.Start, data) -> np.ndarray:
  """The reference log-probabilities of `data`'s pairs: from the workdir, or computed from the model
  the run starts from (then saved there). A resumed run whose pairs changed computes them again from
  the model it started from, and refuses another config.init_from."""
  path = epath.Path(workdir) / REFERENCE_LOGPS
  fingerprint = data.fingerprint()
  resuming = start.kind == start_lib.RESUME
  if path.exists():
    saved = json.loads(path.read_text())
    same_pairs = saved['fingerprint'] == fingerprint
    same_start = _same_path(saved.get('init_from', ''), config.init_from)
    if same_pairs and (resuming or same_start):
      # Resuming, the reference is the model the run started from, whatever path init_from now gives.
      logging.info('Reference log-probabilities of %d pairs read from %s', len(saved['logps']), path)
      return _checked(np.asarray(saved['logps'], np.float32), data)
    if resuming and not same_start:
      raise validate.ConfigError(
          f'{path} holds the reference log-probabilities of the model this run started from, '
          f'config.init_from={saved.get("init_from")}; the preference pairs have changed since, and their '
          f'reference must be that model too, not config.init_from={config.init_from}: resume with '
          f'--config.init_from={saved.get("init_from")}, or use a new --workdir')
    logging.warning('%s was computed for %s; computing them again from config.init_from=%s', path,
                    'other preference pairs (the data changed)' if not same_pairs else
                    f'another starting model ({saved.get("init_from")})', config.init_from)
  params, with_adapters = start_lib.starting_model(run, config, start)
  logps = compute(run, data, params, with_adapters)
  save(workdir, fingerprint, config.init_from, logps)
  return logps


def save(workdir: str, fingerprint: str, init_from: str, logps: np.ndarray):
  """Writes into `workdir` the table of the pairs of `fingerprint` (PreferenceData.fingerprint()),
  computed from the model at `init_from`."""
  if jax.process_index() == 0:
    path = epath.Path(workdir) / REFERENCE_LOGPS
    path.parent.mkdir(parents=True, exist_ok=True)
    workdir_lib.write_text(path, json.dumps({'fingerprint': fingerprint, 'init_from': str(init_from),
                                             'logps': logps.tolist()}))


def _checked(logps: np.ndarray, data) -> np.ndarray:
  expected = (len(data.train_pairs) + len(data.eval_pairs), 2)
  if logps.shape != expected:
    raise ValueError(f'reference log-probabilities of shape {logps.shape}, expected {expected}')
  return logps


def join(batch: dict[str, np.ndarray], logps: np.ndarray | None) -> dict[str, np.ndarray]:
  """A preference batch as the step takes it: without the pairs' index (`example_ids`), with the
  reference's log-probability of each segment's completion from the table `logps` (if any) as
  `ref_logps`, on the segment's first token."""
  batch = dict(batch)
  example_ids = batch.pop('example_ids')
  if logps is not None:
    first = (batch['positions'] == 0) & (batch['segment_ids'] > 0)  # each segment's first token
    values = logps[example_ids, 1 - batch['chosen']]
    if np.isnan(values[first]).any():
      raise ValueError('a pair of this batch has no reference log-probability in the table')
    batch['ref_logps'] = np.where(first, values, 0).astype(np.float32)
  return batch


class Joined:
  """The training iterator of preference batches, each `join`ed; its position is the data's."""

  def __init__(self, batches: Iterator[dict[str, np.ndarray]], logps: np.ndarray | None):
    self._batches, self._logps = batches, logps

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return join(next(self._batches), self._logps)

  def get_state(self) -> bytes:
    return self._batches.get_state()

  def set_state(self, state: bytes):
    self._batches.set_state(state)

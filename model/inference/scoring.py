"""Log-likelihoods of continuations given contexts, batched on the mesh: what evaluation harnesses
(lm-evaluation-harness's `loglikelihood` and `loglikelihood_rolling`, multiple-choice tasks) ask of a
model.

A request is (context ids, continuation ids); its answer is the sum of log p(continuation token |
everything before it) and whether every continuation token is the model's argmax there (`is_greedy`).
As lm-evaluation-harness's Hugging Face backend does it: the sequence context + continuation is cut to
its last `max_length + 1` tokens, the model reads all but the last, and the last len(continuation)
positions are scored. Requests are sorted by length, longest first, and run `batch_size` at a time,
each batch right-padded to a power of two (few shapes, few compilations; causal attention keeps the
padding out of every real position). Logits exist for a chunk of positions at a time (at most
`logits_bytes` of float32), never for [batch, length, vocab] at once: 128k vocabularies.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from model import sharding
from model.config import ModelConfig
from model.lora import LoraConfig
from model.transformer import Transformer


def _bucket(length: int) -> int:
  """The padded length of a batch whose longest row has `length` tokens: a power of two, >= 16."""
  return max(16, 1 << (length - 1).bit_length())


class Scorer:
  """Scores (context, continuation) requests with fixed parameters; compiles once per (batch, bucket)."""

  def __init__(self, model_config: ModelConfig, params, mesh=None, rules=sharding.LOGICAL_AXIS_RULES,
               batch_size: int = 16, max_length: int = 0, logits_bytes: int = 2**30,
               lora: LoraConfig = LoraConfig()):
    """`max_length`: the longest input the model reads (default: model_config.max_seq_len). `lora`:
    the params hold LoRA adapters over their base (model/lora.py), applied unmerged."""
    self.config, self.params = model_config, params
    self.max_length = max_length or model_config.max_seq_len
    self.model = Transformer(model_config, lora=lora)
    self._mesh, self._rules = mesh, rules
    shards = 1 if mesh is None else mesh.shape['data'] * mesh.shape['fsdp']
    self.batch_size = -(-batch_size // shards) * shards  # every batch shard gets whole rows
    self._logits_bytes = logits_bytes
    self._score = {}  # jitted per logits chunk length

  def _chunk(self, length: int) -> int:
    """Positions per logits chunk: a power of two dividing `length` (itself a power of two)."""
    budget = self._logits_bytes // (4 * self.batch_size * self.config.vocab_size)
    return max(1, min(length, 1 << max(budget, 1).bit_length() - 1))

  def _scorer(self, chunk: int):
    if chunk in self._score:
      return self._score[chunk]
    model = self.model

    def score(params, tokens, targets, weights):
      """-> (sum of weighted log-probabilities [B], every weighted position greedy [B])."""
      batch, length = tokens.shape
      hidden = model.apply({'params': params}, tokens, method=Transformer.hidden_states)

      def chunked(x):  # [B, T, ...] -> [T/chunk, B, chunk, ...], each chunk keeping the batch sharding
        x = x.reshape((batch, length // chunk, chunk) + x.shape[2:]).swapaxes(0, 1)
        return nn.with_logical_constraint(x, (None,) + sharding.BATCH_AXES + (None,) * (x.ndim - 3))

      def one_chunk(args):
        h, t = args
        logits = model.apply({'params': params}, h, method=Transformer.logits)
        target_logits = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return target_logits - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == t

      logp, greedy = jax.lax.map(one_chunk, (chunked(hidden), chunked(targets)))
      unchunk = lambda x: x.swapaxes(0, 1).reshape(batch, length)
      logp, greedy, weights = unchunk(logp), unchunk(greedy), weights > 0
      return jnp.sum(jnp.where(weights, logp, 0.0), axis=-1), jnp.all(greedy | ~weights, axis=-1)

    if self._mesh is None:
      fn = jax.jit(score)
    else:  # every host gets the whole result (multi-host: each runs the same requests)
      fn = jax.jit(sharding.with_logical_rules(score, self._mesh, self._rules),
                   out_shardings=sharding.replicated(self._mesh))
    self._score[chunk] = fn
    return fn

  def batch_arrays(self, rows: Sequence[tuple[list[int], int]]):
    """(tokens, targets, weights) [batch_size, bucket] of rows (full sequence, continuation length)."""
    length = _bucket(max(len(full) - 1 for full, _ in rows))
    tokens, targets, weights = (np.zeros((self.batch_size, length), np.int32) for _ in range(3))
    for i, (full, n_cont) in enumerate(rows):
      n = len(full) - 1
      tokens[i, :n], targets[i, :n] = full[:-1], full[1:]
      weights[i, n - n_cont:n] = 1
    return tokens, targets, weights

  def score(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
            progress: bool | None = False) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of each (context ids, continuation ids), in the order given.
    `progress`: a bar of requests scored (None: only on a terminal)."""
    rows = []
    for context, continuation in requests:
      if not 0 < len(continuation) <= self.max_length:
        raise ValueError(f'a continuation must have 1 to max_length ({self.max_length}) tokens, got '
                         f'{len(continuation)}')
      if not context:
        raise ValueError('a request needs at least one context token (e.g. BOS)')
      rows.append((list(context) + list(continuation))[-(self.max_length + 1):])
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    results: list[tuple[float, bool] | None] = [None] * len(rows)
    with tqdm.tqdm(total=len(rows), desc='Scoring', unit='request',
                   disable=None if progress is None else not progress) as bar:
      for start in range(0, len(order), self.batch_size):
        batch = order[start:start + self.batch_size]
        arrays = self.batch_arrays([(rows[i], len(requests[i][1])) for i in batch])
        ll, greedy = self._scorer(self._chunk(arrays[0].shape[1]))(self.params, *arrays)
        ll, greedy = np.asarray(ll), np.asarray(greedy)
        for row, i in enumerate(batch):
          results[i] = (float(ll[row]), bool(greedy[row]))
        bar.update(len(batch))
    return results


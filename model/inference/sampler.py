"""The sampler: batched generation with a key/value cache on live parameters.

Prompts of different lengths share a batch: they are left-padded (segment id 0 marks padding, so no
token attends to it) and positions count from each prompt's first real token. One jitted call runs the
prefill and then a `lax.while_loop` of single-token steps, each costing one position, not a pass.
"""

import contextlib
import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from model import sharding
from model.config import ModelConfig
from model.lora import LoraConfig
from model.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int = 128
  temperature: float = 0.0  # 0 means greedy
  top_k: int = 0            # 0 means no top-k filter
  top_p: float = 1.0        # 1 means no nucleus filter
  seed: int = 0
  # Sample only ids below this (the tokenizer's size, when the model's embedding table is padded
  # beyond it); 0 means every id.
  vocab_limit: int = 0


def sample_logits(logits, rng, temperature: float, top_k: int, top_p: float):
  """logits [B, V] -> token ids [B]. Greedy when temperature is 0."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if 0 < top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest set whose probability reaches top_p (always at least the best token).
    cutoff_index = jnp.minimum(jnp.sum(cumulative < top_p, axis=-1, keepdims=True), logits.shape[-1] - 1)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = 16):
  """Prompts -> tokens, segment_ids, positions [B, P], P rounded up to limit recompilation."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError('Every prompt must have at least one token')
  length = -(-max(len(p) for p in prompts) // multiple) * multiple
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  segments = np.zeros((len(prompts), length), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, length - len(p):] = p
    segments[i, length - len(p):] = 1
  positions = np.maximum(np.cumsum(segments, axis=1) - 1, 0).astype(np.int32)
  return tokens, segments, positions


class Generator:
  """Generates continuations with fixed parameters. Compiles once per (batch, prompt bucket, length)."""

  def __init__(self, model_config: ModelConfig, params, mesh=None, rules=None,
               lora: LoraConfig = LoraConfig()):
    """`lora`: the params hold LoRA adapters (model/lora.py), applied unmerged."""
    self.config = model_config
    self.params = params
    self.model = Transformer(model_config, decode=True, lora=lora)
    self._mesh, self._rules = mesh, rules
    self._compiled = {}  # ahead-of-time compiled executables, see `compile`

  def _cache(self, batch: int, length: int):
    shapes = jax.eval_shape(
        lambda: self.model.init(jax.random.key(0), jnp.zeros((batch, length), jnp.int32)))['cache']
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  @functools.partial(jax.jit, static_argnums=(0, 5, 6))
  def _generate(self, params, tokens, segments, positions, sampling: SamplingConfig,
                stop_ids: tuple[int, ...], rng):
    """Prefill, then one position per step until every row has stopped: (tokens [B, steps], steps)."""
    batch, prompt_len = tokens.shape
    steps = sampling.max_new_tokens
    cache = self._cache(batch, prompt_len + steps)
    apply = lambda cache, t, s, p: self.model.apply({'params': params, 'cache': cache}, t, s, p,
                                                    mutable=['cache'])
    logits, variables = apply(cache, tokens, segments, positions)
    stops = jnp.asarray(stop_ids, jnp.int32)

    def cond(carry):
      i, _, _, _, _, _, done = carry
      return (i < steps) & ~jnp.all(done)

    def body(carry):
      i, cache, last_logits, position, rng, out, done = carry
      rng, step_rng = jax.random.split(rng)
      if 0 < sampling.vocab_limit < last_logits.shape[-1]:
        last_logits = jnp.where(jnp.arange(last_logits.shape[-1]) < sampling.vocab_limit, last_logits,
                                -jnp.inf)
      token = sample_logits(last_logits, step_rng, sampling.temperature, sampling.top_k,
                            sampling.top_p)
      token = jnp.where(done, stops[0], token)
      out = out.at[:, i].set(token)
      done = done | jnp.isin(token, stops)
      ones = jnp.ones((batch, 1), jnp.int32)
      logits, variables = apply(cache, token[:, None], ones, position[:, None])
      return i + 1, variables['cache'], logits[:, -1], position + 1, rng, out, done

    init = (jnp.zeros((), jnp.int32), variables['cache'], logits[:, -1], positions[:, -1] + 1, rng,
            jnp.full((batch, steps), stops[0], jnp.int32), jnp.zeros((batch,), bool))
    steps_taken, *_, out, _ = jax.lax.while_loop(cond, body, init)
    return out, steps_taken

  def _inputs(self, prompts, sampling: SamplingConfig, stop_ids, pad_id):
    if not stop_ids:
      raise ValueError('Give at least one stop token id (e.g. the tokenizer EOS)')
    if (sampling.max_new_tokens < 1 or sampling.temperature < 0 or sampling.top_k < 0
        or not 0 <= sampling.top_p <= 1):
      raise ValueError(f'{sampling}: max_new_tokens must be >= 1, temperature and top_k >= 0, and '
                       'top_p in [0, 1]')
    tokens, segments, positions = left_pad(prompts, pad_id)
    longest = max(len(p) for p in prompts)  # padding takes no positions
    if longest + sampling.max_new_tokens > self.config.max_seq_len:
      raise ValueError(f'prompt ({longest} tokens) + max_new_tokens ({sampling.max_new_tokens}) exceeds '
                       f'model.max_seq_len ({self.config.max_seq_len})')
    stop_ids = tuple(int(i) for i in stop_ids)
    dynamic = (self.params, tokens, segments, positions, jax.random.key(sampling.seed))
    # What the compiled program depends on: the seed is an input, everything else is static.
    return dynamic, (tokens.shape, dataclasses.replace(sampling, seed=0), stop_ids)

  def _context(self):
    if self._mesh is None:
      return contextlib.nullcontext()
    return sharding.activate(self._mesh, self._rules)

  def compile(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
              stop_ids: Sequence[int], pad_id: int = 0) -> float:
    """Compiles ahead of time for these prompts' shapes (so that timing `generate` excludes it).
    Returns the seconds it took."""
    start = time.perf_counter()
    (params, tokens, segments, positions, rng), key = self._inputs(prompts, sampling, stop_ids, pad_id)
    if key not in self._compiled:
      with self._context():
        self._compiled[key] = self._generate.lower(
            self, params, tokens, segments, positions, key[1], key[2], rng).compile()
    return time.perf_counter() - start

  def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
               stop_ids: Sequence[int], pad_id: int = 0, include_stop: bool = False) -> list[list[int]]:
    """New tokens for each prompt, up to the first stop token (included with `include_stop`)."""
    (params, tokens, segments, positions, rng), key = self._inputs(prompts, sampling, stop_ids, pad_id)
    with self._context():
      if key in self._compiled:
        out, _ = self._compiled[key](params, tokens, segments, positions, rng)
      else:
        out, _ = self._generate(params, tokens, segments, positions, key[1], key[2], rng)
    if not out.is_fully_addressable:  # several hosts: each gets every row
      out = multihost_utils.process_allgather(out, tiled=True)
    out = np.asarray(out)
    stops = set(key[-1])
    results = []
    for row in out:
      stop_at = [j for j, t in enumerate(row) if t in stops]
      results.append(row[:stop_at[0] + include_stop].tolist() if stop_at else row.tolist())
    return results

"""The sampler: batched generation with a key/value cache, on parameters given at each call.

`Sampler.sample(params, prompts, sampling, stop_ids, rng)` takes the parameters when it is called,
not when it is built: the live parameters of a training run (plain, or a LoRA tree, the frozen base
joined with the adapters as model/lora.py's `join` builds it, applied unmerged), with no copy of any
weight. It returns device arrays (`SampleResult`): each row's completion ids, the mask of the sampled
tokens through the stop token, their log-probabilities, the length and whether it was truncated.
`Generator` is the same on fixed parameters, with token-id lists in and out (the commands and the
evaluations use it).

Prompts of different lengths share a batch: they are left-padded (segment id 0 marks padding, so no
token attends to it) and positions count from each prompt's first real token. One jitted program per
(batch, prompt length, max_new_tokens rounded up to a multiple of 32, sampling settings, stop ids)
runs the prefill and then `lax.while_loop`s of single-token steps, each costing one position, not a
pass, with no host work between steps. The loops come in up to four phases, each over a key/value
cache of the length it needs (grown between phases), so that a step reads the slots filled so far
and not those of the longest completion.

Log-probabilities: each sampled token's log-softmax under the model's float32 logits over the whole
vocabulary, divided by `logprobs_temperature` (1 by default: the raw logits, which is what a training
step computes for the same tokens; TRL's GRPO trainer divides by the sampling temperature, which
`logprobs_temperature=temperature` reproduces). Never those of the distribution after the top-k,
top-p or vocab_limit filters: a policy-gradient loss compares them with the trainer's.
"""

import contextlib
import dataclasses
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from model import sharding
from model import transformer
from model.config import ModelConfig
from model.lora import LoraConfig
from model.transformer import Transformer

NEW_TOKENS_MULTIPLE = 32  # max_new_tokens is rounded up to this for compiling: a program serves many
MAX_PHASES = 4            # decoding loops per program, each over a longer cache


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
  # The returned log-probabilities are of logits / this (see the module docstring).
  logprobs_temperature: float = 1.0


class SampleResult(NamedTuple):
  """What `Sampler.sample` returns, per row, as device arrays (sharded as the batch is)."""
  tokens: jax.Array     # [B, max_new_tokens] int32: the sampled ids, pad_id after the stop token
  mask: jax.Array       # [B, max_new_tokens] bool: the sampled tokens, through the stop token
  logprobs: jax.Array   # [B, max_new_tokens] float32: each sampled token's log-probability; 0 off mask
  lengths: jax.Array    # [B] int32: tokens sampled, the stop token included
  truncated: jax.Array  # [B] bool: max_new_tokens reached without a stop token


def greedy(logits):
  """The first best id of each row of logits [B, V]: as `jnp.argmax`, but as a max and then a min,
  two plain reductions, which a CPU runs faster than argmax's reduction over (value, index) pairs."""
  best = jnp.max(logits, axis=-1, keepdims=True)
  ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)
  return jnp.min(jnp.where(logits == best, ids, logits.shape[-1] - 1), axis=-1)


def sample_logits(logits, rng, temperature: float, top_k: int, top_p: float):
  """logits [B, V] -> token ids [B]. Greedy when temperature is 0."""
  if temperature == 0:
    return greedy(logits)
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
  return tokens, segments, positions_of(segments)


def positions_of(segments):
  """Positions of left-padded rows: counted from each row's first real token (0 on the padding)."""
  xp = np if isinstance(segments, np.ndarray) else jnp
  return xp.maximum(xp.cumsum(segments > 0, axis=1) - 1, 0).astype(np.int32)


def cache_lengths(prompt_len: int, new_tokens: int) -> list[int]:
  """The key/value cache's length in each decoding phase: at most MAX_PHASES, in steps of a multiple
  of 32 new tokens. Step i (writing new token i - 1) needs prompt_len + i slots."""
  block = -(-new_tokens // (MAX_PHASES * 32)) * 32
  return [prompt_len + min(new_tokens, block * (j + 1)) for j in range(-(-new_tokens // block))]


class Sampler:
  """Samples completions with the parameters given at each call. Compiles once per (batch, prompt
  length, max_new_tokens rounded up to a multiple of 32, sampling settings bar the seed, stop ids),
  whatever the parameters' values; `compiles` counts the programs built."""

  def __init__(self, model_config: ModelConfig, mesh=None, rules=None, lora: LoraConfig = LoraConfig()):
    """`mesh`, `rules`: where the parameters live and the logical-axis rules (model/sharding.py);
    `lora`: the parameters hold LoRA adapters (model/lora.py), applied unmerged."""
    self.config = model_config
    self.model = Transformer(model_config, decode=True, lora=lora)
    self._mesh, self._rules = mesh, rules or sharding.LOGICAL_AXIS_RULES
    self.compiles = 0
    self._program = jax.jit(self._sample, static_argnames=('sampling', 'stop_ids', 'pad_id'))

  def _context(self):
    if self._mesh is None:
      return contextlib.nullcontext()
    return sharding.activate(self._mesh, self._rules)

  def _sample(self, params, tokens, segments, max_new, rng, *, sampling: SamplingConfig,
              stop_ids: tuple[int, ...], pad_id: int):
    """The program: prefill, then decoding loops until every row has stopped or max_new tokens."""
    self.compiles += 1  # runs only when tracing
    batch, prompt_len = tokens.shape
    steps = sampling.max_new_tokens  # the bucket: the outputs' width
    apply = lambda cache, t, s, p: self.model.apply({'params': params, 'cache': cache}, t, s, p,
                                                    mutable=['cache'])
    positions = positions_of(segments)
    # The prefill makes the cache, of the prompt's length.
    logits, variables = self.model.apply({'params': params}, tokens, segments, positions,
                                         mutable=['cache'])
    stops = jnp.asarray(stop_ids, jnp.int32)
    vocab = logits.shape[-1]
    allowed = jnp.arange(vocab) < (sampling.vocab_limit or vocab)

    def pick(i, logits, rng, out, logps, lengths, done):
      """Samples token i of every row from its logits [B, V] and records it."""
      logits = logits.astype(jnp.float32)
      token = sample_logits(jnp.where(allowed, logits, -jnp.inf), rng, sampling.temperature,
                            sampling.top_k, sampling.top_p)
      scaled = logits / sampling.logprobs_temperature
      logp = (jnp.take_along_axis(scaled, token[:, None], axis=-1)[:, 0]
              - jax.nn.logsumexp(scaled, axis=-1))
      token = jnp.where(done, pad_id, token)
      out = out.at[:, i].set(token)
      logps = logps.at[:, i].set(jnp.where(done, 0.0, logp))
      lengths = lengths + (~done).astype(jnp.int32)
      return token, out, logps, lengths, done | jnp.isin(token, stops)

    def body(carry):
      i, cache, token, position, rng, out, logps, lengths, done = carry
      rng, step_rng = jax.random.split(rng)
      ones = jnp.ones((batch, 1), jnp.int32)
      logits, variables = apply(cache, token[:, None], ones, position[:, None])
      token, out, logps, lengths, done = pick(i, logits[:, -1], step_rng, out, logps, lengths, done)
      return i + 1, variables['cache'], token, position + 1, rng, out, logps, lengths, done

    rng, first_rng = jax.random.split(rng)
    out = jnp.full((batch, steps), pad_id, jnp.int32)
    logps = jnp.zeros((batch, steps), jnp.float32)
    lengths, done = jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool)
    token, out, logps, lengths, done = pick(0, logits[:, -1], first_rng, out, logps, lengths, done)
    carry = (jnp.ones((), jnp.int32), variables['cache'], token, positions[:, -1] + 1, rng, out, logps,
             lengths, done)
    for length in cache_lengths(prompt_len, steps):
      # Step i writes new token i - 1 at slot prompt_len + i - 1.
      last = jnp.minimum(max_new, length - prompt_len + 1)
      carry = (*carry[:1], transformer.grow_cache(carry[1], length), *carry[2:])
      carry = jax.lax.while_loop(lambda c, last=last: (c[0] < last) & ~jnp.all(c[-1]), body, carry)
    *_, out, logps, lengths, done = carry
    mask = jnp.arange(steps) < lengths[:, None]
    return SampleResult(out, mask, logps, lengths, ~done)

  def prepare(self, prompts, sampling: SamplingConfig, stop_ids: Sequence[int], pad_id: int = 0):
    """Checks the request; returns (tokens, segment ids, static settings) for the program."""
    if not stop_ids:
      raise ValueError('Give at least one stop token id (e.g. the tokenizer EOS)')
    if (sampling.max_new_tokens < 1 or sampling.temperature < 0 or sampling.top_k < 0
        or not 0 <= sampling.top_p <= 1 or sampling.logprobs_temperature <= 0):
      raise ValueError(f'{sampling}: max_new_tokens must be >= 1, temperature and top_k >= 0, top_p in '
                       '[0, 1] and logprobs_temperature > 0')
    if isinstance(prompts, tuple) and len(prompts) == 2 and hasattr(prompts[0], 'shape'):
      tokens, segments = prompts
      if tokens.ndim != 2 or tokens.shape != segments.shape:
        raise ValueError(f'prompt arrays must be [batch, length] tokens and segment ids, got '
                         f'{tokens.shape} and {segments.shape}')
      longest = tokens.shape[1]
    else:
      tokens, segments, _ = left_pad(prompts, pad_id)
      longest = max(len(p) for p in prompts)  # padding takes no positions
    if longest + sampling.max_new_tokens > self.config.max_seq_len:
      raise ValueError(f'prompt ({longest} tokens) + max_new_tokens ({sampling.max_new_tokens}) exceeds '
                       f'model.max_seq_len ({self.config.max_seq_len})')
    bucket = -(-sampling.max_new_tokens // NEW_TOKENS_MULTIPLE) * NEW_TOKENS_MULTIPLE
    static = dict(sampling=dataclasses.replace(sampling, seed=0, max_new_tokens=bucket),
                  stop_ids=tuple(int(i) for i in stop_ids), pad_id=int(pad_id))
    return tokens, segments, static

  def sample(self, params, prompts, sampling: SamplingConfig, stop_ids: Sequence[int], rng=None,
             pad_id: int = 0) -> SampleResult:
    """Completions of `prompts` under `params`.

    `prompts`: token-id lists, or a (tokens, segment_ids) pair of [B, P] arrays, left-padded (segment
    id 0 on the padding, 1 on the prompt). `rng`: a PRNG key or an int seed (default:
    `sampling.seed`). `pad_id` fills the padding and the tokens after each row's stop.
    """
    tokens, segments, static = self.prepare(prompts, sampling, stop_ids, pad_id)
    if rng is None or isinstance(rng, (int, np.integer)):
      rng = jax.random.key(sampling.seed if rng is None else int(rng))
    max_new = np.int32(sampling.max_new_tokens)
    with self._context():
      result = self._program(params, tokens, segments, max_new, rng, **static)
    if sampling.max_new_tokens < static['sampling'].max_new_tokens:
      result = result._replace(**{f: getattr(result, f)[:, :sampling.max_new_tokens]
                                  for f in ('tokens', 'mask', 'logprobs')})
    return result

  def lower(self, params, prompts, sampling: SamplingConfig, stop_ids: Sequence[int], pad_id: int = 0):
    """The program for these prompts' shapes, lowered (`params` and `prompts` may be abstract:
    ShapeDtypeStructs with their shardings, as train.compile gives for a TPU slice)."""
    tokens, segments, static = self.prepare(prompts, sampling, stop_ids, pad_id)
    key = jax.eval_shape(lambda: jax.random.key(0))
    with self._context():
      return self._program.lower(params, tokens, segments, np.int32(sampling.max_new_tokens), key,
                                 **static)

  def compile(self, params, prompts, sampling: SamplingConfig, stop_ids: Sequence[int],
              pad_id: int = 0) -> float:
    """Compiles for these prompts' shapes ahead of the first `sample` (so that timing it excludes
    compilation); returns the seconds it took."""
    start = time.perf_counter()
    self.lower(params, prompts, sampling, stop_ids, pad_id).compile()
    return time.perf_counter() - start


class Generator:
  """Generates continuations with fixed parameters (`params`, which may be replaced between calls):
  token-id lists in and out, on a `Sampler`."""

  def __init__(self, model_config: ModelConfig, params, mesh=None, rules=None,
               lora: LoraConfig = LoraConfig()):
    """`lora`: the params hold LoRA adapters (model/lora.py), applied unmerged."""
    self.config = model_config
    self.params = params
    self.sampler = Sampler(model_config, mesh, rules, lora)

  def _cache(self, batch: int, length: int):
    return transformer.init_cache(self.config, batch, length)

  def compile(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
              stop_ids: Sequence[int], pad_id: int = 0) -> float:
    """Compiles ahead of time for these prompts' shapes (so that timing `generate` excludes it).
    Returns the seconds it took."""
    return self.sampler.compile(self.params, prompts, sampling, stop_ids, pad_id)

  def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
               stop_ids: Sequence[int], pad_id: int = 0, include_stop: bool = False) -> list[list[int]]:
    """New tokens for each prompt, up to the first stop token (included with `include_stop`)."""
    result = self.sampler.sample(self.params, prompts, sampling, stop_ids, pad_id=pad_id)
    tokens, lengths, truncated = result.tokens, result.lengths, result.truncated
    if not tokens.is_fully_addressable:  # several hosts: each gets every row
      tokens, lengths, truncated = (multihost_utils.process_allgather(x, tiled=True)
                                    for x in (tokens, lengths, truncated))
    tokens, lengths, truncated = np.asarray(tokens), np.asarray(lengths), np.asarray(truncated)
    return [row[:n - (not cut and not include_stop)].tolist()
            for row, n, cut in zip(tokens, lengths, truncated)]

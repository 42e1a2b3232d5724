"""The sampler library: per-token log-probabilities equal a teacher-forced pass's, masks and stops,
truncation, live parameters without recompiling, LoRA unmerged as merged, greedy decoding as full
recomputation and as the Generator, unrolled layers as scanned, prompt arrays as lists."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import ModelConfig, Transformer
from model import lora as lora_lib
from model.inference.sampler import Generator, Sampler, SamplingConfig, left_pad, positions_of
from model.transformer import init_params
from model.weights import hf

pytestmark = pytest.mark.unit

CFG = ModelConfig(vocab_size=512, embed_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                  mlp_dim=128, dtype='float32', max_seq_len=256, init_std=0.1, rope_theta=500000.0)
PROMPTS = [[1, 5, 7, 9, 11], [1, 3], list(range(1, 20)), [4] * 30]
UNUSED = CFG.vocab_size  # a stop id no token has: every row runs to max_new_tokens
# 100 new tokens: bucket 128, so the decoding runs through all four cache phases.
SAMPLED = SamplingConfig(max_new_tokens=100, temperature=1.0, seed=3)


def _params(cfg, seed, lora=lora_lib.LoraConfig()):
  return nn.meta.unbox(jax.jit(lambda: init_params(cfg, jax.random.key(seed), lora))())


@pytest.fixture(scope='module')
def params():
  return _params(CFG, 0)


@pytest.fixture(scope='module')
def sampler():
  return Sampler(CFG)


@pytest.fixture(scope='module')
def sampled(sampler, params):
  return sampler.sample(params, PROMPTS, SAMPLED, [UNUSED])


def _teacher_forced_logps(cfg, params, prompts, result, temperature=1.0):
  """log_softmax(logits / temperature) of each completion token, from one pass of the training
  model over prompt + completion (left-padded as the sampler pads)."""
  tokens, segments, _ = left_pad(prompts, 0)
  full = np.concatenate([tokens, np.asarray(result.tokens)], axis=1)
  segments = np.concatenate([segments, np.asarray(result.mask, np.int32)], axis=1)
  logits = jax.jit(Transformer(cfg).apply)({'params': params}, full, segments, positions_of(segments))
  p, n = tokens.shape[1], result.tokens.shape[1]
  logps = jax.nn.log_softmax(logits[:, p - 1:p - 1 + n] / temperature, axis=-1)
  return np.take_along_axis(np.asarray(logps), np.asarray(result.tokens)[..., None], axis=-1)[..., 0]


def test_logprobs_equal_a_teacher_forced_pass(params, sampled):
  assert sampled.tokens.shape == (len(PROMPTS), 100) and bool(np.all(sampled.mask))
  assert np.asarray(sampled.truncated).all() and np.asarray(sampled.lengths).tolist() == [100] * 4
  ours = np.asarray(sampled.logprobs)
  gap = np.abs(ours - _teacher_forced_logps(CFG, params, PROMPTS, sampled)).max()
  print(f'max |sampler logprob - teacher-forced logprob| = {gap:.2e}')
  assert gap < 1e-5
  assert len(set(np.asarray(sampled.tokens).ravel().tolist())) > 50  # sampled, not one token repeated


def test_logprobs_at_the_sampling_temperature(sampler, params):
  """logprobs_temperature: log-probabilities of logits / T (TRL's GRPO convention)."""
  sampling = SamplingConfig(max_new_tokens=20, temperature=0.7, top_k=50, seed=1,
                            logprobs_temperature=0.7)
  result = sampler.sample(params, PROMPTS, sampling, [UNUSED])
  reference = _teacher_forced_logps(CFG, params, PROMPTS, result, temperature=0.7)
  assert np.abs(np.asarray(result.logprobs) - reference).max() < 1e-5


def test_mask_ends_at_the_stop_token_and_truncation_is_flagged(sampler, params, sampled):
  full = np.asarray(sampled.tokens)
  stop = int(full[0, 6])  # row 0 stops at its 7th token; others wherever the id first comes, if at all
  result = sampler.sample(params, PROMPTS, SAMPLED, [stop], pad_id=0)
  tokens, mask = np.asarray(result.tokens), np.asarray(result.mask)
  for row in range(len(PROMPTS)):
    hits = np.flatnonzero(full[row] == stop)
    n = hits[0] + 1 if len(hits) else 100
    assert int(result.lengths[row]) == n and bool(result.truncated[row]) == (not len(hits))
    assert mask[row].tolist() == [True] * n + [False] * (100 - n)
    assert tokens[row, :n].tolist() == full[row, :n].tolist()  # the same draws up to the stop
    assert (tokens[row, n:] == 0).all() and (np.asarray(result.logprobs)[row, n:] == 0).all()
  assert int(result.lengths[0]) == 7 and not bool(result.truncated[0])


def test_live_params_sample_differently_without_recompiling(params):
  sampler = Sampler(CFG)
  other = _params(CFG, 1)
  sampling = SamplingConfig(max_new_tokens=8)
  first = sampler.sample(params, PROMPTS, sampling, [UNUSED])
  second = sampler.sample(other, PROMPTS, sampling, [UNUSED])
  again = sampler.sample(params, PROMPTS, dataclasses.replace(sampling, max_new_tokens=12), [UNUSED])
  assert sampler.compiles == 1  # new parameters, and max_new_tokens in the same bucket of 32
  assert not np.array_equal(first.tokens, second.tokens)
  assert np.array_equal(first.tokens, again.tokens[:, :8]) and again.tokens.shape == (4, 12)


def test_lora_adapters_unmerged_sample_as_the_merged_model():
  lora = lora_lib.LoraConfig(rank=4, targets='q,v,up,down')
  base_and_adapters = _params(CFG, 0, lora)
  adapters, base = lora_lib.split(base_and_adapters)
  # The adapters' B starts at zero (no change); make them matter.
  keys = iter(jax.random.split(jax.random.key(7), 100))
  adapters = jax.tree.map(lambda x: 0.2 * jax.random.normal(next(keys), x.shape), adapters)
  live = lora_lib.join(base, adapters)  # what a LoRA training run holds
  sampling = SamplingConfig(max_new_tokens=16)
  unmerged = Sampler(CFG, lora=lora).sample(live, PROMPTS, sampling, [UNUSED])
  merged = Sampler(CFG).sample(lora_lib.merge(live, lora), PROMPTS, sampling, [UNUSED])
  no_adapters = Sampler(CFG).sample(base, PROMPTS, sampling, [UNUSED])
  assert np.array_equal(unmerged.tokens, merged.tokens)
  assert not np.array_equal(unmerged.tokens, no_adapters.tokens)
  np.testing.assert_allclose(unmerged.logprobs, merged.logprobs, atol=1e-4)


def test_greedy_equals_full_recomputation_and_the_generator(sampler, params):
  steps = 12
  result = sampler.sample(params, PROMPTS, SamplingConfig(max_new_tokens=steps), [UNUSED])
  forward = jax.jit(Transformer(CFG).apply)
  for row, prompt in enumerate(PROMPTS):
    sequence = np.zeros((1, 48), np.int32)  # right-padded to one length: one compilation
    sequence[0, :len(prompt)] = prompt
    for i in range(steps):
      logits = forward({'params': params}, sequence)[0, len(prompt) + i - 1]
      sequence[0, len(prompt) + i] = int(jnp.argmax(logits))
    assert np.asarray(result.tokens[row]).tolist() == sequence[0, len(prompt):len(prompt) + steps].tolist()
  generated = Generator(CFG, params).generate(PROMPTS, SamplingConfig(max_new_tokens=steps), [UNUSED])
  assert generated == np.asarray(result.tokens).tolist()


def test_unrolled_layers_sample_as_scanned(params, sampled):
  cfg = dataclasses.replace(CFG, scan_layers=False)
  result = Sampler(cfg).sample(hf.unstack_layers(params, CFG.n_layers), PROMPTS, SAMPLED, [UNUSED])
  assert np.array_equal(result.tokens, sampled.tokens)
  np.testing.assert_allclose(result.logprobs, sampled.logprobs, atol=1e-5)


def test_prompt_arrays_sample_as_lists(sampler, params, sampled):
  tokens, segments, _ = left_pad(PROMPTS, 0)
  result = sampler.sample(params, (jnp.asarray(tokens), jnp.asarray(segments)), SAMPLED, [UNUSED],
                          rng=jax.random.key(SAMPLED.seed))
  assert np.array_equal(result.tokens, sampled.tokens)
  assert not np.array_equal(sampler.sample(params, PROMPTS, SAMPLED, [UNUSED], rng=4).tokens,
                            sampled.tokens)


def test_bad_requests_are_errors(sampler, params):
  with pytest.raises(ValueError, match='logprobs_temperature'):
    sampler.sample(params, PROMPTS, SamplingConfig(logprobs_temperature=0.0), [UNUSED])
  with pytest.raises(ValueError, match='exceeds model.max_seq_len'):
    sampler.sample(params, PROMPTS, SamplingConfig(max_new_tokens=240), [UNUSED])
  with pytest.raises(ValueError, match='stop token'):
    sampler.sample(params, PROMPTS, SamplingConfig(), [])

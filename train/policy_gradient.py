"""The policy-gradient objective of the shared train step (GRPO and its variants): group advantages
from rewards, and the clipped-surrogate loss over sampled completions.

Online RL samples G completions of each prompt from the live model, scores them with reward functions,
and turns each completion's reward into an advantage relative to its group (`group_advantages`). The
train step then raises the log-probabilities of completions with positive advantage and lowers the
others (`PolicyGradient`, the third objective of train/step.py). The sampler and the entry point build
the batch; this module is only the math, written to agree with TRL's GRPOTrainer option for option
(tests/test_grpo_objective.py checks it against TRL itself).

A batch is the step's usual one (data/batch.py): each sampled completion is one segment, its prompt
followed by the completion, with `loss_weights` 1 on the completion's tokens (through the end token;
0 on the prompt and on padding). Per-token values are aligned with `targets`, like the loss weights
(the value at position t belongs to the token predicted there, `targets[t]`), and matter only where the
loss weight is nonzero:
  advantages    [B, T] float32: the completion's advantage (`group_advantages`) on each of its tokens
  old_logps     [B, T] float32, optional: the log-probability of each completion token under the policy
                that sampled it (at the sampling temperature), for the importance ratio; without it the
                ratio is 1 (on-policy: the current parameters sampled the batch), as TRL without
                `old_per_token_logps`
  ref_logps     [B, T] float32, with beta > 0 unless the reference runs in the step: the frozen reference
                model's log-probabilities of the same tokens (`make_token_logps_step`)

Per completion token, with ratio r = exp(logp - old_logp) (importance_sampling_level 'token'; 'sequence',
GSPO: one ratio per completion, the exponential of its mean per-token log-ratio), advantage A and
reference log-probability ref:
  loss = -min(r A, clip(r, 1 - epsilon_low, 1 + epsilon_high) A) + beta w k3,
  k3 = exp(ref - logp) - (ref - logp) - 1
(DAPO's clip-higher when epsilon_high > epsilon_low; k3 is Schulman's estimator of the KL divergence
from the reference, and w = r, unclipped, with use_bias_correction_kl as TRL's default, else 1). The
per-token losses are aggregated by `loss_type`:
  grpo     the mean over each completion's tokens, then the mean over completions
  dapo     the mean over every completion token of the batch (TRL's default)
  bnpo     the same as dapo here: TRL's bnpo averages over the tokens of each device's micro-batch and
           dapo over the whole accumulated batch, which differ only in how TRL splits a batch; this
           step's micro-batches add up to the whole batch
  dr_grpo  the sum over every completion token / (number of completions x max_completion_length)
Every loss type is a sum over the batch divided by a count that is also a sum (completions, tokens), so
micro-batches and data-parallel shards add up exactly to the whole batch's loss.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from data.batch import BATCH_KEYS
from model import Transformer
from train.step import _chunked, _log_z_and_target_logits, loss_chunks

ADVANTAGES = ('grpo', 'dr_grpo', 'rloo')
LOSS_TYPES = ('grpo', 'dapo', 'bnpo', 'dr_grpo')
IMPORTANCE_SAMPLING_LEVELS = ('token', 'sequence')
# TRL's guard against dividing by a zero standard deviation of a group's rewards.
STD_EPSILON = 1e-4

POLICY_GRADIENT_KEYS = {'advantages': np.float32, 'old_logps': np.float32}
REFERENCE_KEYS = {'ref_logps': np.float32}


def batch_keys(reference: bool = False) -> dict[str, type]:
  """The keys (and dtypes) of a policy-gradient batch, with the reference's log-probabilities."""
  return {**BATCH_KEYS, **POLICY_GRADIENT_KEYS, **(REFERENCE_KEYS if reference else {})}


def group_advantages(rewards, group_size: int, kind: str = 'grpo') -> tuple[np.ndarray, float]:
  """(advantages [N] float32, fraction of groups whose rewards are all equal) of `rewards` [N], N =
  prompts x `group_size`, each prompt's completions consecutive.

  kind 'grpo': (r - group mean) / (group standard deviation + 1e-4), the standard deviation with
  Bessel's correction (TRL GRPOTrainer, scale_rewards='group'); 'dr_grpo': r - group mean (Dr. GRPO:
  no division by the standard deviation, which favours questions that are too easy or too hard; TRL
  scale_rewards='none'); 'rloo': r - the mean of the other G - 1 rewards of the group (TRL
  RLOOTrainer). A group whose rewards are all equal (zero standard deviation, TRL's
  `frac_reward_zero_std`) gets advantage 0 everywhere: it teaches nothing.
  """
  if kind not in ADVANTAGES:
    raise ValueError(f'advantages must be one of {ADVANTAGES}, got {kind!r}')
  r = np.asarray(rewards, np.float64)
  if r.ndim != 1 or group_size < 2 or r.size % group_size:
    raise ValueError(f'rewards must be [prompts x group_size] with group_size >= 2, got shape {r.shape} '
                     f'and group_size {group_size}')
  if not np.isfinite(r).all():
    raise ValueError('every reward must be finite')
  groups = r.reshape(-1, group_size)
  mean = groups.mean(axis=1, keepdims=True)
  std = groups.std(axis=1, ddof=1, keepdims=True)
  if kind == 'grpo':
    advantages = (groups - mean) / (std + STD_EPSILON)
  elif kind == 'dr_grpo':
    advantages = groups - mean
  else:
    advantages = groups - (groups.sum(axis=1, keepdims=True) - groups) / (group_size - 1)
  # np.isclose's tolerances are torch.isclose's, which TRL applies to the standard deviation.
  zero_std = float(np.mean(np.isclose(std[:, 0], 0.0)))
  return advantages.reshape(-1).astype(np.float32), zero_std


def token_logps_and_entropies(model: Transformer, params, batch, loss_chunk_len: int = 0, rngs=None,
                              temperature: float = 1.0, entropies: bool = True):
  """([B, T] float32 log-probability of each target with loss weight, [B, T] float32 entropy of the
  next-token distribution there or None), both 0 elsewhere, of the logits / `temperature` (the
  distribution the sampler drew from, as TRL scores it). The logits exist a sequence chunk at a time as
  in train/step.py's `loss_sums`; the entropy carries no gradient (a metric)."""
  args = (batch['inputs'], batch['segment_ids'], batch['positions'])
  targets, weights = batch['targets'], batch['loss_weights']

  def per_token(logits, t, w):
    logits = logits.astype(jnp.float32) / temperature
    log_z, target_logits = _log_z_and_target_logits(logits, t)
    on = w > 0
    logps = jnp.where(on, target_logits - log_z, 0.0)
    if not entropies:
      return logps, None
    logits, log_z = jax.lax.stop_gradient((logits, log_z))
    entropy = log_z - jnp.sum(jnp.exp(logits - log_z[..., None]) * logits, axis=-1)
    return logps, jnp.where(on, entropy, 0.0)

  n = loss_chunks(targets.shape[1], loss_chunk_len)
  if n == 1:
    return per_token(model.apply({'params': params}, *args, rngs=rngs), targets, weights)
  hidden = model.apply({'params': params}, *args, rngs=rngs, method=Transformer.hidden_states)

  @jax.checkpoint  # the backward pass recomputes each chunk's logits rather than storing them all
  def chunk(carry, xs):
    h, t, w = xs
    return carry, per_token(model.apply({'params': params}, h, method=Transformer.logits), t, w)

  _, out = jax.lax.scan(chunk, (), (_chunked(hidden, n), _chunked(targets, n), _chunked(weights, n)))
  unchunk = lambda x: None if x is None else x.swapaxes(0, 1).reshape(targets.shape)
  return unchunk(out[0]), unchunk(out[1])


def make_token_logps_step(model: Transformer, loss_chunk_len: int = 0, temperature: float = 1.0):
  """`token_logps_step(params, batch) -> [B, T]` log-probabilities of the completion tokens: the
  reference model's (`ref_logps`, with its parameters) or the sampling policy's (`old_logps`, with the
  parameters that sampled, when the sampler does not report them). Jit it as train/step.py's
  `jit_reference_step`."""
  def token_logps_step(params, batch):
    return token_logps_and_entropies(model, params, batch, loss_chunk_len, temperature=temperature,
                                     entropies=False)[0]
  return token_logps_step


def sequence_sums(values, segment_ids) -> jax.Array:
  """[B, T] -> [B, T]: at each token, the sum of `values` over its segment (0 on padding)."""
  num_segments = values.shape[1] + 1  # segment ids are 1, 2, ... per row, at most one per token
  sums = jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, num_segments=num_segments))(values, segment_ids)
  return jnp.where(segment_ids > 0, jnp.take_along_axis(sums, segment_ids, axis=1), 0.0)


def count_sequences(segment_ids) -> jax.Array:
  """The number of segments (sampled completions) in the batch, with or without loss weight: TRL's
  per-completion means count a completion whose tokens are all masked (mask_truncated_completions)."""
  starts = segment_ids[:, 1:] != segment_ids[:, :-1]
  starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), starts], axis=1)
  return jnp.sum((starts & (segment_ids > 0)).astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class PolicyGradient:
  """The clipped-surrogate policy-gradient loss of `loss_type` (LOSS_TYPES) over the sampled completions
  of the batch, plus `beta` x the k3 estimate of the KL divergence from the reference model (see the
  module's docstring). Options are named as in TRL's GRPOConfig, with its defaults except for
  max_completion_length (dr_grpo's constant, no default): epsilon_low is its `epsilon`; `temperature`
  is the sampler's (the log-probabilities are those of the logits / temperature). The reference's
  log-probabilities come from the batch (`ref_logps`), or from `reference_model` run in the step on the
  state's reference parameters (as `Preference`'s)."""
  model: Transformer
  loss_type: str = 'dapo'
  epsilon_low: float = 0.2
  epsilon_high: float = 0.2
  beta: float = 0.0
  max_completion_length: int = 0
  importance_sampling_level: str = 'token'
  temperature: float = 1.0
  use_bias_correction_kl: bool = True
  reference_model: Transformer | None = None
  loss_chunk_len: int = 0
  sum_keys = ('loss', 'weight', 'tokens', 'sequences', 'kl', 'entropy', 'clip_low', 'clip_high',
              'clip_region', 'logp_gap')

  def __post_init__(self):
    if self.loss_type not in LOSS_TYPES:
      raise ValueError(f'loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}')
    if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
      raise ValueError(f'importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, got '
                       f'{self.importance_sampling_level!r}')
    if self.loss_type == 'dr_grpo' and self.max_completion_length <= 0:
      raise ValueError('loss_type dr_grpo divides by max_completion_length: set it (> 0)')
    if self.temperature <= 0:
      raise ValueError(f'temperature must be > 0, got {self.temperature}')

  def _reference_logps(self, batch, reference):
    if not self.beta:
      return None
    if 'ref_logps' in batch:
      return batch['ref_logps']
    if self.reference_model is None or reference is None:
      raise ValueError('beta > 0 needs the reference model: ref_logps in the batch, or its parameters in '
                       'the train state')
    return jax.lax.stop_gradient(token_logps_and_entropies(
        self.reference_model, reference, batch, self.loss_chunk_len, temperature=self.temperature,
        entropies=False)[0])

  def token_sums(self, logps, entropies, batch, ref_logps=None) -> dict[str, jax.Array]:
    """The batch sums of `sum_keys`, from the policy's per-token log-probabilities and entropies [B, T]
    (`token_logps_and_entropies`) and the batch; everything in float32."""
    f32 = lambda x: x.astype(jnp.float32)
    mask, segments = f32(batch['loss_weights']), batch['segment_ids']
    on = mask > 0
    # Each completion's tokens weigh 1 together: sums with these weights are sums of per-completion means.
    per_sequence = mask / jnp.maximum(sequence_sums(mask, segments), 1.0)
    old = f32(batch['old_logps']) if 'old_logps' in batch else jax.lax.stop_gradient(logps)
    # `where`, not a product with the mask: whatever stands on padding must not reach the loss (inf x 0).
    log_ratio = jnp.where(on, logps - old, 0.0)
    if self.importance_sampling_level == 'sequence':
      log_ratio = sequence_sums(log_ratio * per_sequence, segments)
    advantages = jnp.where(on, f32(batch['advantages']), 0.0)
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1 - self.epsilon_low, 1 + self.epsilon_high)
    losses = -jnp.minimum(ratio * advantages, clipped * advantages)
    kl = jnp.zeros_like(losses)
    if self.beta:
      d = jnp.where(on, f32(ref_logps) - logps, 0.0)
      kl = jnp.exp(d) - d - 1
      if self.use_bias_correction_kl:
        # Weighted by the (unclipped, differentiable) ratio, the k3 term's gradient is that of the reverse
        # KL divergence from the reference also off-policy (DeepSeek-V3.2); TRL's default.
        kl = kl * ratio
      losses = losses + self.beta * kl
    tokens, sequences = jnp.sum(mask), count_sequences(segments)
    weight = {'grpo': sequences, 'dapo': tokens, 'bnpo': tokens,
              'dr_grpo': sequences * self.max_completion_length}[self.loss_type]
    # TRL's clip fractions are over tokens, or with one ratio per sequence over sequences.
    clip_weights = per_sequence if self.importance_sampling_level == 'sequence' else mask
    low = (ratio < 1 - self.epsilon_low) & (advantages < 0)
    high = (ratio > 1 + self.epsilon_high) & (advantages > 0)
    fraction = lambda x: jnp.sum(jax.lax.stop_gradient(x.astype(jnp.float32)) * clip_weights)
    token_sum = lambda x: jnp.sum(jax.lax.stop_gradient(x) * mask)
    return {
        'loss': jnp.sum(losses * (per_sequence if self.loss_type == 'grpo' else mask)),
        'weight': weight, 'tokens': tokens, 'sequences': sequences,
        'kl': token_sum(kl), 'entropy': token_sum(f32(entropies)),
        'clip_low': fraction(low), 'clip_high': fraction(high), 'clip_region': fraction(low | high),
        'logp_gap': token_sum(jnp.where(on, jnp.abs(logps - old), 0.0)),
    }

  def sums(self, params, batch, rngs=None, reference=None) -> dict[str, jax.Array]:
    logps, entropies = token_logps_and_entropies(self.model, params, batch, self.loss_chunk_len, rngs,
                                                 self.temperature)
    return self.token_sums(logps, entropies, batch, self._reference_logps(batch, reference))

  def total(self, sums):
    return sums['loss']

  def _means(self, sums, xnp) -> dict[str, jax.Array]:
    """TRL's metrics: means over completion tokens (over completions for sequence-level clipping)."""
    tokens, sequences = xnp.maximum(sums['tokens'], 1.0), xnp.maximum(sums['sequences'], 1.0)
    clips = sequences if self.importance_sampling_level == 'sequence' else tokens
    out = {'entropy': sums['entropy'] / tokens,
           'clip_ratio/low_mean': sums['clip_low'] / clips,
           'clip_ratio/high_mean': sums['clip_high'] / clips,
           'clip_ratio/region_mean': sums['clip_region'] / clips,
           # How far the sampler's log-probabilities are from the trainer's: meaningful before the
           # first update of a batch (afterwards the parameters have moved on); 0 without old_logps.
           'sampler_logp_gap': sums['logp_gap'] / tokens}
    if self.beta:
      out['kl'] = sums['kl'] / tokens
    return out

  def metrics(self, sums, total_weight) -> dict[str, jax.Array]:
    return {'loss': sums['loss'] / total_weight, 'tokens': sums['tokens'], 'sequences': sums['sequences'],
            **self._means(sums, jnp)}

  def eval_results(self, totals) -> dict[str, float]:
    totals = {k: float(v) for k, v in totals.items()}
    return {'eval_loss': totals['loss'] / max(totals['weight'], 1.0),
            **{f'eval_{k}': v for k, v in self._means(totals, np).items()},
            'eval_tokens': totals['tokens'], 'eval_sequences': totals['sequences']}

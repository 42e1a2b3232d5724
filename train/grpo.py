"""Reinforcement-learning entry point (GRPO, Dr. GRPO, DAPO, RLOO): the loop and train step of the other
trainers, with the policy-gradient objective (train/policy_gradient.py), fed completions that the model
being trained samples in process.

  python -m train.grpo --config=configs/grpo_tiny.py --workdir=runs/grpo --config.init_from=runs/sft

Each step (with grpo.num_iterations = mu, each rollout serves mu steps):
  prompts     train.batch_size / G prompts of data.train_files (data/prompts.py; the step number alone
              says which, so a resumed run takes the same ones), each host its share;
  rollout     G = grpo.num_generations completions of each, sampled on the same mesh from the live
              parameters (LoRA: the adapters over the frozen base, unmerged; no copy of the weights)
              by model/inference/sampler.py, with the sampler's per-token log-probabilities; the
              sampling key is the seed folded with the rollout's number, so a resumed run draws the same;
  rewards     the reward functions of grpo.rewards (train/rewards.py) score the decoded completions;
  advantages  each completion's reward against its prompt's group (group_advantages);
  batch       prompt + completion as one segment per row, loss weights on the completion's tokens through
              its end token, the advantage and the sampler's log-probability on each of them;
  step        the shared train step with PolicyGradient (the KL to the frozen start in the step when
              grpo.beta > 0: with LoRA the base with adapters off).
A rollout that serves further steps (mu > 1) is kept with the checkpoint's input position, so that a
run resumed between its steps trains on the same completions. Held-out task metrics, early stopping,
the best checkpoint, preemption, the workdir lock and checksums are those of train.sft.
"""

import dataclasses
import io
import time
from typing import Any

import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

import runtime
from model import sharding
from model.inference.sampler import Sampler, SamplingConfig
from train import batches as batches_lib
from train import hooks, loop, run, validate
from train import rewards as rewards_lib
from train.policy_gradient import group_advantages

FLAGS = flags.FLAGS  # --config and --workdir: run.define_flags(), when run as a program


class Position:
  """The input position of a GRPO run, for checkpoints: the rollout that later steps still train on
  (num_iterations > 1), as bytes; nothing otherwise (the step number says which prompts come next)."""

  def __init__(self):
    self.buffered: tuple[int, dict[str, np.ndarray]] | None = None

  def __iter__(self):
    return self

  def __next__(self):
    return None  # batches come from rollouts (GrpoTrainer.next_batch); the prompts were read already

  def get_state(self) -> bytes:
    if self.buffered is None:
      return b''
    out = io.BytesIO()
    np.savez(out, rollout=np.int64(self.buffered[0]), **self.buffered[1])
    return out.getvalue()

  def set_state(self, state: bytes):
    if not state:
      self.buffered = None
      return
    with np.load(io.BytesIO(state)) as saved:
      self.buffered = int(saved['rollout']), {k: saved[k] for k in saved.files if k != 'rollout'}


class Prompts:
  """The DataSource of a GRPO run (train/loop.py): the prompt set, its held-out conversations for task
  metrics, and no held-out batches (the objective has no held-out loss)."""

  def __init__(self, data, rewards: rewards_lib.Rewards | None = None, chat: bool = False):
    """`rewards`: tried on a few prompts with their reference answers as completions, so that a reward
    function that cannot work fails before the workdir is written to."""
    self.data = data
    if rewards is not None:
      probe = data.prompts[:4]
      answers = [p.columns.get('reference', '') for p in probe]
      rewards.score([p.prompt for p in probe],
                    [[{'role': 'assistant', 'content': a}] for a in answers] if chat else answers,
                    {k: [p.columns.get(k) for p in probe] for k in probe[0].columns},
                    [p.where for p in probe])
    self.vocab_size = data.vocab_size
    self.tokenizer, self.template = data.tokenizer, data.template
    self.eval_conversations = data.eval_conversations
    self.position = Position()

  def train_iterator(self, shard_index: int, shard_count: int, batch_size: int):
    del shard_index, shard_count, batch_size
    return self.position

  def eval_batches(self, *_, **__):
    return []

  def stats(self) -> dict[str, int]:
    return self.data.stats()


@dataclasses.dataclass
class Rollout:
  """One rollout's rows on this host (numpy), and what the metrics need of it."""
  batch: dict[str, np.ndarray]
  metrics: dict[str, float]


def _left_padded(prompts, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  segments = np.zeros((len(prompts), length), np.int32)
  for i, ids in enumerate(prompts):
    tokens[i, length - len(ids):] = ids
    segments[i, length - len(ids):] = 1
  return tokens, segments


def completion_rows(prompts, completions, logprobs, advantages, seq_len: int) -> dict[str, np.ndarray]:
  """Train rows: each prompt followed by its completion as one segment, right-padded to `seq_len`;
  loss weights, advantages and the sampler's log-probabilities on the completion's tokens (aligned
  with `targets`: the value at position t is that of the token predicted there)."""
  n = len(prompts)
  batch = {k: np.zeros((n, seq_len), np.int32) for k in ('inputs', 'targets', 'segment_ids', 'positions')}
  batch.update({k: np.zeros((n, seq_len), np.float32)
                for k in ('loss_weights', 'advantages', 'old_logps')})
  for i, (prompt, completion) in enumerate(zip(prompts, completions)):
    tokens = list(prompt) + list(completion)
    length = len(tokens) - 1
    if length > seq_len:
      raise ValueError(f'a prompt ({len(prompt)} tokens) and its completion ({len(completion)}) exceed '
                       f'train.seq_len ({seq_len})')
    batch['inputs'][i, :length] = tokens[:-1]
    batch['targets'][i, :length] = tokens[1:]
    batch['segment_ids'][i, :length] = 1
    batch['positions'][i, :length] = np.arange(length)
    first = len(prompt) - 1  # where the completion's first token is predicted
    batch['loss_weights'][i, first:length] = 1.0
    batch['advantages'][i, first:length] = advantages[i]
    batch['old_logps'][i, first:length] = logprobs[i][:len(completion)]
  return batch


def _gathered(x: np.ndarray) -> np.ndarray:
  """`x` of every host, concatenated (this host's alone in a single-process run)."""
  return multihost_utils.process_allgather(x, tiled=True) if jax.process_count() > 1 else x


class RolloutMetrics(hooks.Hook):
  """Writes the mean of the rollouts' metrics since the last log line, at the log line's cadence."""

  def __init__(self, every: int, record):
    self.every, self.record = every, record
    self.pending: list[dict[str, float]] = []

  def __call__(self, info: hooks.StepInfo):
    if self.pending:
      self.record(info.step, {k: float(np.mean([m[k] for m in self.pending if k in m]))
                              for k in self.pending[-1]})
      self.pending = []


class GrpoTrainer(loop.Trainer):
  """The shared Trainer, whose batches are rollouts of the current parameters."""

  def __init__(self, config: Any, workdir: str, run_: run.Run, data: Prompts, start, reference_logps=None):
    super().__init__(config, workdir, run_, data, start, reference_logps)
    grpo, tcfg = config.grpo, config.train
    self.grpo, self.prompts = grpo, data
    self.rewards = rewards_lib.Rewards(grpo.rewards, grpo.reward_weights, grpo.reward_column)
    self.sampler = Sampler(self.run.model_config, self.run.mesh, sharding.LOGICAL_AXIS_RULES,
                           self.run.lora)
    self.sampling = SamplingConfig(max_new_tokens=grpo.max_completion_len, temperature=grpo.temperature,
                                   top_k=grpo.top_k, top_p=grpo.top_p, vocab_limit=data.vocab_size,
                                   logprobs_temperature=grpo.temperature)
    self.stop_ids = data.template.stop_ids
    self.shard_index, self.shard_count, self.local_rows = batches_lib.data_shard(
        self.run.batch_sharding, tcfg.batch_size)
    self.rows = batches_lib.process_batch_rows(self.run.batch_sharding, tcfg.batch_size)
    if self.local_rows % grpo.num_generations:
      raise validate.ConfigError(
          f'each host feeds {self.local_rows} rows of train.batch_size={tcfg.batch_size}, which must '
          f'hold whole groups of grpo.num_generations={grpo.num_generations} completions')
    self.prompts_per_step = tcfg.batch_size // grpo.num_generations
    # The padded prompt length: one compiled sampling program for the whole run.
    self.prompt_len = -(-grpo.max_prompt_len // 16) * 16
    self.rollout_metrics = RolloutMetrics(tcfg.log_every, self.record)
    self.add_hook(self.rollout_metrics)

  def next_batch(self, step: int):
    """The rollout for the step after `step`: sampled anew every num_iterations steps, else the one
    kept since (also across a resume)."""
    rollout_index = step // self.grpo.num_iterations
    position = self.prompts.position
    if position.buffered is None or position.buffered[0] != rollout_index:
      rollout = self.rollout(rollout_index)
      self.rollout_metrics.pending.append(rollout.metrics)
      position.buffered = (rollout_index, rollout.batch) if self.grpo.num_iterations > 1 else None
      local = rollout.batch
    else:
      local = position.buffered[1]
    return self.run.global_batch(local)

  def rollout(self, index: int) -> Rollout:
    """Samples, scores and turns into train rows the completions of rollout `index` (this host's)."""
    grpo, tokenizer = self.grpo, self.prompts.tokenizer
    start = time.perf_counter()
    prompts = self.prompts.data.at_step(index, self.prompts_per_step, self.shard_index, self.shard_count)
    rows = [p for p in prompts for _ in range(grpo.num_generations)]
    tokens, segments = _left_padded([p.ids for p in rows], self.prompt_len, tokenizer.pad_id)
    arrays = self.run.global_batch({'tokens': tokens, 'segments': segments})
    key = jax.random.fold_in(jax.random.key(self.config.train.seed), index)
    result = self.sampler.sample(self.state.model_params, (arrays['tokens'], arrays['segments']),
                                 self.sampling, self.stop_ids, key, tokenizer.pad_id)
    first, last = self.rows
    fetch = lambda x: np.asarray(_gathered_global(x))[first:last]
    sampled, lengths, logprobs = fetch(result.tokens), fetch(result.lengths), fetch(result.logprobs)
    truncated = fetch(result.truncated)
    sampling_s = time.perf_counter() - start

    completions = [row[:n].tolist() for row, n in zip(sampled, lengths)]
    stops = set(self.stop_ids)
    texts = [tokenizer.decode(c[:-1] if c and c[-1] in stops else c) for c in completions]
    chat = self.config.data.format == 'chat'
    shown = [[{'role': 'assistant', 'content': t}] for t in texts] if chat else texts
    columns = {k: [p.columns.get(k) for p in rows] for k in rows[0].columns}
    table, total = self.rewards.score([p.prompt for p in rows], shown, columns, [p.where for p in rows])
    advantages, _ = group_advantages(total, grpo.num_generations, grpo.advantages)
    batch = completion_rows([p.ids for p in rows], completions, logprobs, advantages,
                            self.config.train.seq_len)
    return Rollout(batch, self._metrics(table, total, lengths, truncated, sampling_s,
                                        time.perf_counter() - start))

  def _metrics(self, table, total, lengths, truncated, sampling_s, rollout_s) -> dict[str, float]:
    """TRL's names where it has them: the rewards (overall, each function's), the groups that teach
    nothing, the completions' lengths, and where the rollout's time went."""
    g = self.grpo.num_generations
    table, total = _gathered(table.T).T, _gathered(total)
    lengths, truncated = _gathered(lengths), _gathered(truncated)
    groups = total.reshape(-1, g)
    out = {'reward': float(total.mean()), 'reward_std': float(groups.std(axis=1, ddof=1).mean()),
           'frac_reward_zero_std': float(np.mean(groups.std(axis=1) == 0)),
           'completions/mean_length': float(lengths.mean()), 'completions/max_length': float(lengths.max()),
           'completions/min_length': float(lengths.min()),
           'completions/clipped_ratio': float(truncated.mean()),
           'time/sampling_s': sampling_s, 'time/rollout_s': rollout_s,
           'sampling/tokens_per_sec': float(lengths.sum()) / max(sampling_s, 1e-9)}
    for name, values in zip(self.rewards.names, table):
      out[f'rewards/{name}/mean'] = float(values.mean())
      out[f'rewards/{name}/std'] = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return out


def _gathered_global(x: jax.Array):
  """A global array's every row on this host."""
  if x.is_fully_addressable:
    return x
  return multihost_utils.process_allgather(x, tiled=True)


def train(config, workdir: str, data=None) -> dict[str, float]:
  """Trains config.init_from with rewards on the prompts of `data` (default: the PromptData of
  config.data) in `workdir`, resuming it if it holds checkpoints; returns the last logged metrics."""
  if validate.objective(config) != 'grpo':
    raise validate.ConfigError(f'train.grpo trains the policy-gradient objective: config.train.objective '
                               f'must be "grpo", got {validate.objective(config)!r}')
  if not config.init_from:
    raise validate.ConfigError('train.grpo improves a trained model: set config.init_from to it (a '
                               'checkpoint, usually of instruction tuning, or an imported Hugging Face '
                               'model)')
  rewards = rewards_lib.Rewards(config.grpo.rewards, config.grpo.reward_weights,
                                config.grpo.reward_column)

  def make_data():  # by loop.train once the workdir is locked and its config checked
    prompts = data
    if prompts is None:
      from data.prompts import PromptData  # pylint: disable=import-outside-toplevel
      prompts = PromptData(config.data, config.grpo.max_prompt_len)
    return Prompts(prompts, rewards, config.data.format == 'chat')

  return loop.train(config, workdir, make_data, trainer=GrpoTrainer)


def main(argv):
  runtime.no_positional_arguments(argv)
  config = FLAGS.config
  runtime.setup(config.distributed)
  train(config, FLAGS.workdir)


if __name__ == '__main__':
  run.define_flags()
  runtime.run(main)

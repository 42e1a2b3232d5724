"""Reinforcement learning from rewards on the demo's checked-answer task: the instruction-tuned tiny
model (configs/sft_tiny.py) samples answers to the training questions, rewarded by exact match.

  python -m train.grpo --config=configs/grpo_tiny.py --workdir=demo/grpo --config.init_from=demo/sft
"""

from configs import sft_tiny


def get_config():
  c = sft_tiny.get_config()
  c.init_from = 'demo/sft'
  c.train.objective = 'grpo'
  c.train.steps = 200
  # 64 completions a step: 8 answers to each of 8 questions.
  c.train.batch_size = 64
  c.train.seq_len = 64
  c.train.eval_every = 50
  c.train.log_every = 10
  c.optimizer.lr = 2e-5
  c.optimizer.warmup_steps = 10
  c.optimizer.weight_decay = 0.0
  c.checkpoint.every_steps = 50
  c.grpo.update(dict(num_generations=8, max_prompt_len=48, max_completion_len=16, temperature=1.0,
                     rewards='exact_match', loss_type='dapo', advantages='grpo', beta=0.0))
  c.data.format = 'chat'
  c.data.train_files = 'demo/grpo_data/train.jsonl'
  c.data.eval_files = 'demo/grpo_data/eval.jsonl'
  c.eval.generation.update(dict(metrics='exact_match', num_prompts=1326, max_new_tokens=16,
                                batch_size=128))
  return c

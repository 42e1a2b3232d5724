"""Instruction-tunes the demo's tiny model on the demo's checked-answer task (see data/demo_corpus.py).

  python -m train.sft --config=configs/sft_tiny.py --workdir=demo/sft --config.init_from=demo/pretrain
"""

from configs import tiny


def get_config():
  c = tiny.get_config()
  c.init_from = 'demo/pretrain'
  c.train.steps = 300
  c.train.eval_every = 100
  c.train.log_every = 25
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_steps = 20
  c.checkpoint.every_steps = 100
  c.data.format = 'chat'
  c.data.chat_template = 'llama2'
  c.data.train_files = 'demo/sft_data/train.jsonl'
  c.data.eval_files = 'demo/sft_data/eval.jsonl'
  return c

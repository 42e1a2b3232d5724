"""The demo's instruction tuning (configs/sft_tiny.py) with LoRA: rank-16 adapters on all seven
projections of the frozen pretrained tiny model: 155,648 parameters trained, 12% of its 1.3M.

  python -m train.sft --config=configs/sft_tiny_lora.py --workdir=demo/sft_lora --config.init_from=demo/pretrain
"""

from configs import sft_tiny


def get_config():
  c = sft_tiny.get_config()
  c.lora.update(dict(rank=16, alpha=32.0, targets='q,k,v,o,gate,up,down'))
  # Adapters start at zero and move a small subspace: they take a higher learning rate, no decay.
  c.optimizer.lr = 5e-3
  c.optimizer.weight_decay = 0.0
  return c

"""A ~27M-parameter model (width 512) for CPU benchmarks and quick experiments.

  python -m train.benchmark --config=configs/small.py
  python -m train.pretrain --config=configs/small.py --workdir=runs/small --config.data.format=synthetic
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model = default.model_config('small')
  c.train.steps = 2000
  c.train.batch_size = 16
  c.train.seq_len = 256
  c.train.log_every = 20
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_steps = 100
  c.data.format = 'synthetic'
  return c

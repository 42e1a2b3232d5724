"""The demo: a ~1.3M-parameter model on the shipped demo corpus, a few minutes on a laptop CPU.

Run `scripts/demo.sh` first (or `python -m data.demo_corpus`) to create demo/data/.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model = default.model_config('tiny')
  # Four layers compile as fast unrolled as scanned, and step ~10% faster on CPU, where a scan zeroes
  # and fills stacked copies of every layer's activations each step (docs/benchmarks.md). Deep models
  # scan: their compile time would grow with depth.
  c.model.scan_layers = False
  c.train.steps = 600
  c.train.batch_size = 16
  c.train.seq_len = 256
  c.train.log_every = 50
  c.train.eval_every = 200
  c.optimizer.lr = 3e-3
  c.optimizer.warmup_steps = 50
  c.checkpoint.every_steps = 200
  c.data.format = 'jsonl'
  c.data.train_files = 'demo/data/train.jsonl'
  c.data.eval_files = 'demo/data/eval.jsonl'
  c.data.tokenizer = 'demo/tokenizer.model'
  return c

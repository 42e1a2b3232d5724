"""Llama 3.2 1B's shape at sequence length 4096 on one GPU (H100/H200): the GPU benchmark.

  python -m train.benchmark --config=configs/llama_1b.py --steps 20

bfloat16 compute with float32 weights and Adam state, cuDNN flash attention (attention 'auto' on a
GPU), the 128k-vocabulary loss in 1024-position chunks, no rematerialisation.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model = default.model_config('llama3_2_1b', remat_policy='none')
  c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
  c.train.update(dict(steps=10_000, batch_size=4, seq_len=4096, loss_chunk_len=1024, log_every=10,
                      eval_every=1000))
  c.optimizer.update(dict(lr=3e-4, warmup_steps=500))
  c.data.format = 'synthetic'
  return c

"""qwen2_7b: pretraining (default) and instruction tuning (":sft") at sequence length 4096.

  python -m train.compile --config=configs/qwen2_7b.py:v5p-8 --topology=v5p-8
  python -m train.pretrain --config=configs/qwen2_7b.py:v5p-8 --workdir=gs://bucket/runs/qwen2_7b \
      --config.data.train_files=... --config.data.tokenizer=...

Options after the colon: a slice (v5p-8, the default; v4-8; v5e-8) and/or 'sft' (see configs/scale.py).
The per-slice settings below fit that slice with both steps compiled (docs/benchmarks.md).
"""

from configs import scale

SLICES = {
    # 4 chips x 95 GiB: float32 weights and Adam state; the MLP is recomputed in the backward pass.
    'v5p-8': dict(mesh=dict(data=1, fsdp=-1, tensor=1), batch_size=16,
                  remat_policy='save_dots_except_mlp'),
    # 4 chips x 32 GiB: float32 weights, bfloat16 Adam moments, whole layers recomputed.
    'v4-8': dict(mesh=dict(data=1, fsdp=-1, tensor=1), batch_size=4, remat_policy='full',
                 state_dtype='bfloat16'),
    # 8 chips x 16 GiB: float32 weights do not fit; bfloat16 weights and moments do.
    'v5e-8': dict(mesh=dict(data=1, fsdp=-1, tensor=1), batch_size=8, remat_policy='full',
                  param_dtype='bfloat16', state_dtype='bfloat16', loss_chunk_len=512),
}


def get_config(options: str = ''):
  return scale.make('qwen2_7b', SLICES, options, chat_template='chatml')

"""qwen3_8b: pretraining (default) and instruction tuning (":sft") at sequence length 4096.

  python -m train.compile --config=configs/qwen3_8b.py:v5p-8 --topology=v5p-8
  python -m train.sft --config=configs/qwen3_8b.py:v5p-8,sft --workdir=gs://bucket/runs/qwen3_sft \
      --config.init_from=gs://bucket/ckpt/qwen3_8b --config.data.train_files=... \
      --config.data.tokenizer=...   # the Hugging Face model's folder (its tokenizer.json)

Options after the colon: a slice (v5p-8, the default; v4-8; v5e-8) and/or 'sft' (see configs/scale.py).
Llama 3 8B's per-slice settings fit this model too (8.2B parameters, 36 layers, a 152k vocabulary),
both steps compiled for each slice (docs/benchmarks.md): float32 weights and Adam state with the MLP
recomputed on a v5p-8; bfloat16 weights and moments, whole layers recomputed and the loss in
512-position chunks on a v4-8 and a v5e-8. The chat template is ChatML, as Qwen3's instruct models use.
"""

from configs import llama3_8b, scale

SLICES = llama3_8b.SLICES


def get_config(options: str = ''):
  return scale.make('qwen3_8b', SLICES, options, chat_template='chatml')

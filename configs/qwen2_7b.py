"""qwen2_7b: pretraining (default) and instruction tuning (":sft") at sequence length 4096.

  python -m train.compile --config=configs/qwen2_7b.py:v5e-8 --topology=v5e-8
  python -m train.sft --config=configs/qwen2_7b.py:v5p-8,sft --workdir=gs://bucket/runs/qwen2_sft \
      --config.init_from=gs://bucket/ckpt/qwen2_7b --config.data.train_files=... \
      --config.data.tokenizer=...   # the Hugging Face model's folder (its tokenizer.json)

Options after the colon: a slice (v5p-8, the default; v4-8; v5e-8) and/or 'sft' (see configs/scale.py).
Mistral 7B's per-slice settings fit this model too, both steps compiled for each slice
(docs/benchmarks.md). The chat template is plain ChatML; Qwen2-Instruct's own also adds a default
system prompt to conversations without one: --config.data.chat_template=tokenizer renders exactly that.
"""

from configs import mistral_7b, scale

SLICES = mistral_7b.SLICES


def get_config(options: str = ''):
  return scale.make('qwen2_7b', SLICES, options, chat_template='chatml')

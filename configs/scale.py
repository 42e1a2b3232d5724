"""Builds the 7-8B configs: one model preset, plus settings per TPU slice, plus an SFT variant.

A config file made with `make` takes options after a colon, comma-separated:

  --config=configs/llama2_7b.py            pretraining, settings for the default slice (v5p-8)
  --config=configs/llama2_7b.py:v5e-8      pretraining, settings that fit a v5e-8
  --config=configs/llama2_7b.py:v4-8,sft   instruction tuning, settings that fit a v4-8
  --config=configs/llama3_8b.py:v6e-1,sft,lora   LoRA instruction tuning on one v6e chip
  --config=configs/llama3_8b.py:v5e-1,sft,lora   QLoRA (nf4 base) on one v5e chip
  --config=configs/llama3_8b.py:v5p-8,dpo        preference tuning (DPO, train.dpo) of every weight
  --config=configs/llama3_8b.py:v6e-1,dpo,lora   DPO of LoRA adapters (reference: the base, adapters off)

Every slice's settings (mesh, batch, rematerialisation, dtypes) were checked by compiling both steps
for that slice with `python -m train.compile`; docs/benchmarks.md has the per-chip memory of each.
With 'lora', the slice comes from LORA_SLICES: rank-16 adapters on all seven projections over the
frozen init_from model.
"""

from typing import Any

from configs import default

# Instruction tuning starts from a pretrained checkpoint (or an imported Hugging Face model).
SFT = dict(lr=2e-5, warmup_steps=100, weight_decay=0.0, min_lr_ratio=0.0, steps=3000)
# LoRA trains ~0.5% of the parameters, at a higher learning rate (the QLoRA paper's 2e-4 for 7B).
LORA = dict(rank=16, alpha=32.0, dropout=0.0, lr=2e-4)
# Preference tuning starts from an instruction-tuned model, at the small learning rates of the DPO
# paper and Zephyr (5e-7 for every weight; LoRA adapters 5e-6), for a few epochs of pairs.
DPO = dict(lr=5e-7, lora_lr=5e-6, warmup_steps=100, steps=2000)
# Reinforcement learning from rewards (train.grpo) after instruction tuning: TRL's GRPOConfig defaults
# (8 completions per prompt, learning rate 1e-6), prompts of up to 512 tokens and completions of up to
# 1024 (reasoning answers); the batch counts completions, 8 groups of 8. LoRA adapters learn at 1e-5.
GRPO = dict(lr=1e-6, lora_lr=1e-5, warmup_steps=10, steps=1000, num_generations=8, batch_size=64,
            max_prompt_len=512, max_completion_len=1024)

# Slices for LoRA / QLoRA fine-tuning of a 7-8B model (option 'lora'), the same for each of them: the
# frozen base in bfloat16 (one v6e chip, 32 GiB; or FSDP over a v5e-4) or in nf4 (one v5e chip,
# 16 GiB, at sequence length 2048); whole layers recomputed, the loss in 512-position chunks.
LORA_SLICES = {
    'v6e-1': dict(mesh=dict(data=1, fsdp=-1, tensor=1), batch_size=1, remat_policy='full',
                  param_dtype='bfloat16', base_dtype='bfloat16', loss_chunk_len=512),
    'v5e-4': dict(mesh=dict(data=1, fsdp=-1, tensor=1), batch_size=4, remat_policy='full',
                  param_dtype='bfloat16', base_dtype='bfloat16', loss_chunk_len=512),
    'v5e-1': dict(mesh=dict(data=1, fsdp=-1, tensor=1), batch_size=1, remat_policy='full',
                  param_dtype='bfloat16', base_dtype='nf4', loss_chunk_len=512, seq_len=2048),
}


def make(preset: str, slices: dict[str, dict[str, Any]], options: str, chat_template: str,
         default_slice: str = 'v5p-8'):
  opts = [o for o in options.split(',') if o]
  lora = 'lora' in opts
  if lora:
    slices, default_slice = LORA_SLICES, 'v6e-1'
  unknown = [o for o in opts if o not in ('sft', 'dpo', 'grpo', 'lora') and o not in slices]
  if unknown:
    raise ValueError(f'Unknown config option(s) {unknown}; known: sft, dpo, grpo, lora, '
                     f'{", ".join(slices)}' + (' (the slices for lora)' if lora else ''))
  chosen = [o for o in opts if o in slices]
  settings = slices[chosen[-1] if chosen else default_slice]

  c = default.get_config()
  c.model = default.model_config(preset, remat_policy=settings['remat_policy'],
                                 param_dtype=settings.get('param_dtype', 'float32'))
  c.mesh.update(settings['mesh'])
  c.train.update(dict(steps=100_000, batch_size=settings['batch_size'],
                      seq_len=settings.get('seq_len', 4096),
                      grad_accum_steps=settings.get('grad_accum_steps', 1),
                      loss_chunk_len=settings.get('loss_chunk_len', 1024), log_every=10,
                      eval_every=1000, eval_max_batches=10))
  c.optimizer.update(dict(lr=3e-4, warmup_steps=2000, state_dtype=settings.get('state_dtype', '')))
  c.checkpoint.update(dict(every_steps=1000, keep=3))
  c.data.format = 'jsonl'
  if 'sft' in opts or 'dpo' in opts or 'grpo' in opts:
    c.init_from = ''
    c.train.update(dict(steps=SFT['steps'], eval_every=200))
    c.optimizer.update(dict(lr=SFT['lr'], warmup_steps=SFT['warmup_steps'],
                            weight_decay=SFT['weight_decay'], min_lr_ratio=SFT['min_lr_ratio']))
    c.checkpoint.every_steps = 500
    c.data.format = 'chat'
    c.data.chat_template = chat_template
  if lora:
    c.lora.update(dict(rank=LORA['rank'], alpha=LORA['alpha'], dropout=LORA['dropout'],
                       base_dtype=settings['base_dtype']))
    c.optimizer.update(dict(lr=LORA['lr'], weight_decay=0.0))
  if 'dpo' in opts:
    c.train.update(dict(objective='dpo', steps=DPO['steps']))
    c.optimizer.update(dict(lr=DPO['lora_lr'] if lora else DPO['lr'], warmup_steps=DPO['warmup_steps']))
    c.data.format = 'preference'
  if 'grpo' in opts:
    # Microbatches of at most the tokens of the slice's own batch (the step's activations fit then).
    seq_len = GRPO['max_prompt_len'] + GRPO['max_completion_len']
    fits = settings['batch_size'] * settings.get('seq_len', 4096)
    accum = 1
    while accum < GRPO['batch_size'] and GRPO['batch_size'] * seq_len > accum * fits:
      accum *= 2
    c.train.update(dict(objective='grpo', steps=GRPO['steps'], batch_size=GRPO['batch_size'],
                        seq_len=seq_len, grad_accum_steps=accum))
    c.optimizer.update(dict(lr=GRPO['lora_lr'] if lora else GRPO['lr'], warmup_steps=GRPO['warmup_steps']))
    c.grpo.update(dict(num_generations=GRPO['num_generations'], max_prompt_len=GRPO['max_prompt_len'],
                       max_completion_len=GRPO['max_completion_len']))
  return c

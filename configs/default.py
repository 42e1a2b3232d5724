"""Every setting the trainers read, with defaults. Other configs start from this one."""

import dataclasses

import ml_collections

from data import config as data_config
from model import preset
from model.lora import LoraConfig


def model_config(name: str, **overrides) -> ml_collections.ConfigDict:
  """A model preset as a ConfigDict holding every ModelConfig field, so any can be overridden."""
  return ml_collections.ConfigDict({'preset': name, **dataclasses.asdict(preset(name, **overrides))})


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = model_config('tiny')

  # Device mesh: sizes of the data / fsdp / tensor axes; -1 takes whatever devices remain.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

  c.train = ml_collections.ConfigDict(dict(
      steps=1000,
      batch_size=32,         # global batch, in sequences (rows of seq_len tokens)
      seq_len=256,
      grad_accum_steps=1,    # microbatches per step; batch_size must divide evenly
      z_loss=0.0,            # weight of the log(Z)^2 auxiliary loss (PaLM uses 1e-4)
      seed=0,
      log_every=10,
      eval_every=200,        # 0: only at the end
      eval_at_start=True,    # held-out loss before the first update
      eval_max_batches=20,   # per evaluation, per host
      max_consecutive_skips=10,  # stop after this many steps in a row with a non-finite loss/grad
      override_workdir_config=False,  # resume a workdir even if its run used another config
      take_over_lock=False,  # run even if the workdir's lock says another run holds it
      # The loss computes float32 logits for this many positions at a time (0: the whole sequence at
      # once); for a 128k vocabulary the logits are the largest activation of the step.
      loss_chunk_len=1024,
      # 'lm': next-token cross-entropy on the targets with loss weight (pretraining, instruction
      # tuning); 'dpo': a preference loss over pairs (train.dpo; the `dpo` section below).
      objective='lm',
      # Stop when an evaluated value stops improving, and keep its best checkpoint (train/evaluation.py):
      # metric '' (off), eval_loss, eval_perplexity or eval_<task metric of eval.generation>; mode
      # '' (min for loss and perplexity, max for task metrics), min or max; patience: evaluations
      # without a new best before stopping (0: never stop, only keep the best); min_delta: how much
      # better a new best must be.
      early_stopping=ml_collections.ConfigDict(dict(metric='', mode='', patience=3, min_delta=0.0)),
  ))

  c.optimizer = ml_collections.ConfigDict(dict(
      lr=3e-4, warmup_steps=100, decay_steps=0,  # decay_steps 0: decay until train.steps
      min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0,
      state_dtype='',        # dtype of Adam's moments ('' = the parameters'; 'bfloat16' halves them)
  ))

  # fall_back_to_intact: resume from the newest intact checkpoint when the latest fails its checksums
  # (the damaged one is kept as <step>.damaged); False stops with a message naming both.
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3, async_save=True,
                                                fall_back_to_intact=False))

  # Task metrics of generated answers during instruction tuning (train/evaluation.py): greedy answers
  # to the first num_prompts held-out conversations, every every_steps steps (0: with each held-out
  # loss evaluation), scored by `metrics` (comma-separated: exact_match, f1, rouge1, rouge2, rougeL,
  # bleu, chrf; '' for none).
  c.eval = ml_collections.ConfigDict(dict(generation=ml_collections.ConfigDict(dict(
      metrics='', num_prompts=100, every_steps=0, max_new_tokens=32, batch_size=32))))

  # The input pipelines' settings (formats, files, tokenizer, chat template, packing, bad input).
  c.data = data_config.get_config()

  # Start from these parameters (a workdir, its checkpoints/ or a step folder, or a converted Hugging
  # Face model): instruction tuning, continued pretraining, and the base model of a LoRA run.
  c.init_from = ''

  # LoRA / QLoRA (model/lora.py): rank 0 trains every parameter; rank > 0 trains low-rank adapters on
  # `targets` over the frozen init_from model, held in `base_dtype` ('': model.param_dtype; int8, nf4).
  c.lora = ml_collections.ConfigDict(dataclasses.asdict(LoraConfig()))

  # Preference tuning (train.dpo, train.objective='dpo'; train/step.py `Preference`): the loss
  # (sigmoid: DPO, with label_smoothing conservative DPO; robust; ipo; simpo: reference-free, with
  # simpo_gamma), beta, sft_weight (> 0: plus that times the chosen answers' mean negative
  # log-likelihood, RPO), and where the frozen reference model's log-probabilities come from:
  # 'precompute' (one pass over the data before training, kept in the workdir) or 'step' (computed in
  # every step; the full-model case holds a second copy of the weights). docs/benchmarks.md compares them.
  c.dpo = ml_collections.ConfigDict(dict(loss='sigmoid', beta=0.1, label_smoothing=0.0, simpo_gamma=0.5,
                                         sft_weight=0.0, reference='precompute'))

  # Metrics always go to <workdir>/metrics.jsonl and TensorBoard; set a project to also use W&B.
  c.logging = ml_collections.ConfigDict(dict(wandb_project='', wandb_entity=''))

  # Multi-process runs outside TPU VMs / SLURM: the coordinator's host:port, and this process's place.
  # initialization_timeout_s: how long every process waits for the others to join.
  c.distributed = ml_collections.ConfigDict(dict(coordinator_address='', num_processes=0, process_id=-1,
                                                 initialization_timeout_s=300))
  return c

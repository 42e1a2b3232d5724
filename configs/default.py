"""Every setting the trainers read, with defaults. Other configs start from this one."""

import dataclasses

import ml_collections

from data import config as data_config
from model import preset
from model.lora import LoraConfig
from train import spec


def model_config(name: str, **overrides) -> ml_collections.ConfigDict:
  """A model preset as a ConfigDict holding every ModelConfig field, so any can be overridden."""
  return ml_collections.ConfigDict({'preset': name, **dataclasses.asdict(preset(name, **overrides))})


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = model_config('tiny')

  # train, optimizer, checkpoint, eval, dpo, mesh, logging, distributed: each key's default, its check
  # and what it means are written once, in train/spec.py.
  c.update(spec.default_sections())

  # The input pipelines' settings (formats, files, tokenizer, chat template, packing, bad input).
  c.data = data_config.get_config()

  # Start from these parameters (a workdir, its checkpoints/ or a step folder, or a converted Hugging
  # Face model): instruction tuning, continued pretraining, and the base model of a LoRA run.
  c.init_from = ''

  # LoRA / QLoRA (model/lora.py): rank 0 trains every parameter; rank > 0 trains low-rank adapters on
  # `targets` over the frozen init_from model, held in `base_dtype` ('': model.param_dtype; int8, nf4).
  c.lora = ml_collections.ConfigDict(dataclasses.asdict(LoraConfig()))

  return c

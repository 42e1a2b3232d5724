"""The Hugging Face PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`) and
our adapters: names, layouts and settings, both ways.

PEFT keeps, for each adapted module of a Llama/Mistral/Qwen2 model, `lora_A.weight` [r, in] and
`lora_B.weight` [out, r] under `base_model.model.<module>` and computes `W x + s B A x` with
`s = lora_alpha / r` (`/ sqrt(r)` with `use_rslora`). Ours are A [in dims..., r] and B [r, out dims...]
in the weight's own layout (model/weights/hf.py maps it to HF's), so A_hf = A.reshape(-1, r).T and
B_hf = B.reshape(r, -1).T.
"""

import os
import re

import numpy as np

from model import lora as lora_lib
from model.config import ModelConfig
from model.lora import LoraConfig
from model.weights import hf, safetensors, untrusted

CONFIG, WEIGHTS = 'adapter_config.json', 'adapter_model.safetensors'
_PREFIX = 'base_model.model.'


def _projections(cfg: ModelConfig):
  """model/weights/hf.py's entries for the projections that may carry adapters."""
  return [p for p in hf.param_map(cfg) if p.path[-1] in lora_lib.PROJECTIONS]


def _layer(tree, cfg: ModelConfig, path, i):
  """Our per-layer array at `path` (('layers', 'attn', 'q_proj_lora_a')), or None if absent."""
  node = tree if cfg.scan_layers else tree.get(f'layers_{i}', {})
  for key in (path if cfg.scan_layers else path[1:]):
    node = node.get(key) if isinstance(node, dict) else None
    if node is None:
      return None
  return node[i] if cfg.scan_layers else node


def _module(p, i: int) -> str:
  return p.hf_name.format(i).removesuffix('.weight')


def adapter_files(adapters: dict, cfg: ModelConfig, lora: LoraConfig, base_name: str,
                  dtype=np.float32) -> tuple[dict, list]:
  """(adapter_config.json contents, safetensors tensors) for our adapters (host arrays)."""
  tensors, modules = [], {}
  for p in _projections(cfg):
    for i in range(cfg.n_layers):
      a = _layer(adapters, cfg, p.path[:-1] + (p.path[-1] + '_lora_a',), i)
      if a is None:
        continue
      b = _layer(adapters, cfg, p.path[:-1] + (p.path[-1] + '_lora_b',), i)
      a_hf = np.ascontiguousarray(a.reshape(-1, lora.rank).T, dtype)
      b_hf = np.ascontiguousarray(b.reshape(lora.rank, -1).T, dtype)
      for name, x in (('lora_A', a_hf), ('lora_B', b_hf)):
        tensors.append((f'{_PREFIX}{_module(p, i)}.{name}.weight', x.shape, x.dtype,
                        lambda x=x: iter([x])))
      modules.setdefault(p.path[-1], []).append(i)
  if all(len(layers) == cfg.n_layers for layers in modules.values()):
    target_modules = sorted(modules)  # PEFT: every module whose name ends with one of these
  else:  # some layers only: PEFT matches a string with re.fullmatch against the module's full name
    target_modules = '|'.join(re.escape(_module(p, i)) for p in _projections(cfg)
                              for i in modules.get(p.path[-1], []))
  config = {'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'r': lora.rank, 'lora_alpha': lora.alpha,
            'lora_dropout': lora.dropout, 'target_modules': target_modules, 'bias': 'none',
            'use_rslora': lora.rslora, 'use_dora': False, 'fan_in_fan_out': False,
            'init_lora_weights': True, 'inference_mode': True, 'modules_to_save': None,
            'base_model_name_or_path': base_name}
  return config, tensors


def write(out: str, adapters: dict, cfg: ModelConfig, lora: LoraConfig, base_name: str):
  config, tensors = adapter_files(adapters, cfg, lora, base_name)
  os.makedirs(out, exist_ok=True)
  safetensors.write_safetensors(os.path.join(out, WEIGHTS), tensors)
  hf.write_json(os.path.join(out, CONFIG), config)


# Settings of adapter_config.json we cannot represent, and the value that we can.
_UNSUPPORTED = {'bias': 'none', 'use_dora': False, 'fan_in_fan_out': False, 'modules_to_save': None,
                'rank_pattern': {}, 'alpha_pattern': {}, 'layer_replication': None,
                'target_parameters': None, 'trainable_token_indices': None, 'use_qalora': False}


def read(adapter_dir: str, cfg: ModelConfig, where: str) -> tuple[LoraConfig, dict]:
  """(LoraConfig, adapters as host float32 arrays in our layout) of a PEFT adapter folder, for the base
  model `cfg` (described as `where` in errors). adapter_config.json's values are checked for type, and
  every adapter tensor's shape (from the safetensors header) before any tensor is read."""
  path = os.path.join(adapter_dir, CONFIG)
  config = untrusted.Fields(untrusted.read_json(path), path)
  if config.get('peft_type') != 'LORA':
    raise ValueError(f'{path}: peft_type={config.get("peft_type")!r}; only LORA adapters are supported')
  for key, ok in _UNSUPPORTED.items():
    if config.get(key) not in (None, ok, [], {}):
      raise ValueError(f'{path}: {key}={config.get(key)!r} is not supported (only {ok!r})')
  rank = config.integer('r')
  settings = dict(rank=rank, alpha=config.number('lora_alpha', positive=True),
                  dropout=config.number('lora_dropout', 0.0), rslora=config.boolean('use_rslora', False))
  try:
    lora = LoraConfig(**settings)
  except ValueError as e:  # e.g. a dropout of 1 or more
    raise ValueError(f'{path}: {e}') from None
  reader = safetensors.SafetensorsReader(adapter_dir)
  keys = {k.replace('.lora_A.default.', '.lora_A.').replace('.lora_B.default.', '.lora_B.'): k
          for k in reader.entries}
  wanted, used = {}, set()
  for p in _projections(cfg):
    n_out = lora_lib.PROJECTIONS[p.path[-1]][1]
    in_shape, out_shape = p.shape[:-n_out], p.shape[-n_out:]
    fan_in, fan_out = int(np.prod(in_shape)), int(np.prod(out_shape))
    for i in range(cfg.n_layers):
      a_key, b_key = (f'{_PREFIX}{_module(p, i)}.{x}.weight' for x in ('lora_A', 'lora_B'))
      if a_key not in keys:
        continue
      if b_key not in keys:
        raise ValueError(f'{adapter_dir}: {a_key} has no {b_key} beside it')
      for key, want in ((a_key, (rank, fan_in)), (b_key, (fan_out, rank))):
        shape = reader.entries[keys[key]].shape
        if shape != want:
          raise ValueError(f'{adapter_dir}: {key} has shape {shape}, but the base model {where} '
                           f'needs {want} (rank {rank}): the adapter was made for another base model')
      wanted[(p, i)] = (a_key, b_key, in_shape, out_shape)
      used |= {a_key, b_key}
  unknown = sorted(set(keys) - used)
  if unknown or not wanted:
    raise ValueError(f'{adapter_dir}: {len(unknown)} adapter tensor(s) the base model {where} has no '
                     f'place for, e.g. {unknown[:3]}; expected names like '
                     f'{_PREFIX}{_module(_projections(cfg)[0], 0)}.lora_A.weight')
  found = {}
  for (p, i), (a_key, b_key, in_shape, out_shape) in wanted.items():
    a, b = (reader.read(keys[k]).astype(np.float32) for k in (a_key, b_key))
    found[(p, i)] = (a.T.reshape(in_shape + (rank,)), b.T.reshape((rank,) + out_shape))
  names = sorted({p.path[-1] for p, _ in found}, key=list(lora_lib.PROJECTIONS).index)
  every_layer = all((p, i) in found for p in _projections(cfg) if p.path[-1] in names
                    for i in range(cfg.n_layers))
  if every_layer or cfg.scan_layers:
    # Stacked layers hold an adapter in every layer: where PEFT has none, A = B = 0 is exactly none.
    targets = ','.join(lora_lib.PROJECTIONS[n][0] for n in names)
  else:
    targets = '|'.join(f'layers_{i}/{"/".join(p.path[1:])}' for p, i in found)
  lora = LoraConfig(**{**lora.to_dict(), 'targets': targets})
  return lora, _nest(found, cfg, names)


def _nest(found: dict, cfg: ModelConfig, names) -> dict:
  tree: dict = {}
  for p in _projections(cfg):
    if p.path[-1] not in names:
      continue
    for suffix, k in (('_lora_a', 0), ('_lora_b', 1)):
      layers = [found[(p, i)][k] if (p, i) in found else None for i in range(cfg.n_layers)]
      template = next(x for x in layers if x is not None)
      layers = [np.zeros_like(template) if x is None else x for x in layers]
      if cfg.scan_layers:
        node = tree.setdefault('layers', {}).setdefault(p.path[1], {})
        node[p.path[-1] + suffix] = np.stack(layers)
      else:
        for i, x in enumerate(layers):
          if (p, i) in found:
            tree.setdefault(f'layers_{i}', {}).setdefault(p.path[1], {})[p.path[-1] + suffix] = x
  return tree

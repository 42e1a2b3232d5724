"""LoRA models on disk: the frozen base a checkpoint of adapters refers to, loaded (and quantized) the
way its LoraConfig says and checked against the fingerprint saved with the adapters.

A LoRA step folder (model/weights/params.py) holds only the adapters (and, in training, their optimizer
state); its `lora` item names the base's own step folder and that base's fingerprint
(`fingerprint`: a hash per parameter), so that adapters never silently run on another base. Loading a
quantized base (int8 / nf4) reads it on the host and quantizes it a layer at a time on the device, so
that a base too large for the device in bfloat16 (an 8B model on one 16 GiB chip) never has to fit
there unquantized.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from model import lora as lora_lib
from model.config import DTYPES, ModelConfig
from model.lora import LoraConfig
from model.weights import params as params_lib


def fingerprint(params) -> dict[str, int]:
  """{parameter path: 32-bit hash of its values} of a plain parameter tree (numpy or jax arrays)."""
  out = {}
  for path, x in traverse_util.flatten_dict(params).items():
    if isinstance(x, np.ndarray):
      h = lora_lib.leaf_fingerprint(x, xp=np)
    else:
      h = jax.jit(lora_lib.leaf_fingerprint)(x)
    out['/'.join(path)] = int(h)
  return out


def base_pointer(base_path, fingerprint_: dict[str, int], lora: LoraConfig) -> dict:
  """The `lora` item saved with adapters, pointing to their base: their config, the base's step
  folder, its fingerprint."""
  return {'config': lora.to_dict(), 'base': str(params_lib.resolve_step_dir(base_path)),
          'fingerprint': fingerprint_}


def differing(fingerprint_: dict[str, int], expected: dict[str, int]) -> list[str]:
  """The parameters whose fingerprints differ (or that only one side has), sorted."""
  return sorted(k for k in set(fingerprint_) | set(expected) if fingerprint_.get(k) != expected.get(k))


def check_base(pointer: dict, fingerprint_: dict[str, int], where: str):
  """Raises unless the base just loaded is the one the adapters at `where` were trained on."""
  differ = differing(fingerprint_, pointer['fingerprint'])
  if differ:
    raise ValueError(f'{where}: its LoRA adapters were trained on the base model at {pointer["base"]}, '
                     f'but that checkpoint now holds different weights ({len(differ)} parameter(s) '
                     f'differ, e.g. {differ[:3]}); the adapters would compute something else on it. '
                     'Restore that base, or train new adapters.')


def _refuse_adapters(path):
  pointer = params_lib.load_base_pointer(path)
  if pointer is not None:
    raise ValueError(f'{path} holds LoRA adapters (over {pointer["base"]}), not the weights of a base model')


def load_base(path, cfg: ModelConfig, lora: LoraConfig, mesh=None) -> tuple[dict, dict[str, int]]:
  """(frozen base parameters, fingerprint) from the plain checkpoint at `path`, held as `lora` says
  (dtype or quantized projections) and placed on `mesh` as in training (or on one device)."""
  cfg = lora.base_config(cfg)
  placed = params_lib.abstract_params_on(cfg, mesh, lora)
  _, target = lora_lib.split(placed)
  if not lora.quantized:
    _refuse_adapters(path)
    base = params_lib.load_params(path, target)
    return base, fingerprint(base)
  host = load_plain_numpy(path, cfg)
  quantize = jax.jit(lora_lib.quantize, static_argnums=(1, 2, 3))
  slice_fingerprint = jax.jit(lora_lib.leaf_fingerprint)
  flat_target = traverse_util.flatten_dict(target)
  out, prints = {}, {}
  for path_, w in traverse_util.flatten_dict(host).items():
    name = path_[-1]
    key = '/'.join(path_)
    if name not in lora_lib.PROJECTIONS:
      out[path_] = jax.device_put(w, flat_target[path_].sharding)
      prints[key] = int(slice_fingerprint(out[path_]))
      continue
    # One layer at a time on the device (a stacked weight's slices), codes and scales back to host.
    stacked = path_[0] == 'layers'
    pieces = [w[i] for i in range(w.shape[0])] if stacked else [w]
    codes, scales, h = [], [], 0
    for i, piece in enumerate(pieces):
      piece = jnp.asarray(piece)
      c, s = quantize(piece, lora.base_dtype, lora.block_size, lora_lib.block_axis(name))
      h = (h + int(slice_fingerprint(piece, jnp.uint32((i * piece.size) % 2**32)))) % 2**32
      codes.append(np.asarray(c))
      scales.append(np.asarray(s))
      del piece, c, s
    stack = (lambda xs: np.stack(xs)) if stacked else (lambda xs: xs[0])
    scale_path = path_[:-1] + (name + lora_lib.SCALE_SUFFIX,)
    out[path_] = jax.device_put(stack(codes), flat_target[path_].sharding)
    out[scale_path] = jax.device_put(stack(scales), flat_target[scale_path].sharding)
    prints[key] = h
  del host
  return traverse_util.unflatten_dict(out), prints


def load_checked_base(pointer: dict, cfg: ModelConfig, lora: LoraConfig, mesh, where: str) -> dict:
  base, prints = load_base(pointer['base'], cfg, lora, mesh)
  check_base(pointer, prints, where)
  return base


def load_model(path, mesh=None, param_dtype: str | None = None) -> tuple[ModelConfig, LoraConfig, Any]:
  """(ModelConfig, LoraConfig, parameters) of the checkpoint at `path`, for
  `Transformer(cfg, lora=lora)`: plain weights, or adapters joined with the base they were trained on
  (read from the checkpoint it references, and checked). `param_dtype` overrides the stored one."""
  cfg = params_lib.load_model_config(path)
  if param_dtype:
    cfg = dataclasses.replace(cfg, param_dtype=param_dtype)
  pointer = params_lib.load_base_pointer(path)
  if pointer is None:
    return cfg, LoraConfig(), params_lib.load_params(path, params_lib.abstract_params_on(cfg, mesh))
  lora = LoraConfig.from_dict(pointer['config'])
  if param_dtype and lora.base_dtype not in lora_lib.QUANTIZED:
    lora = dataclasses.replace(lora, base_dtype=param_dtype)
  base = load_checked_base(pointer, cfg, lora, mesh, str(path))
  adapters, _ = lora_lib.split(params_lib.abstract_params_on(cfg, mesh, lora))
  return cfg, lora, lora_lib.join(base, params_lib.load_params(path, adapters))


def load_plain_numpy(path, cfg: ModelConfig, dtype: str | None = None) -> dict:
  """A base model's parameters as host arrays (in `dtype`, default its own), refusing adapters."""
  _refuse_adapters(path)
  return params_lib.load_params_numpy(path, cfg, dtype or cfg.param_dtype)


def load_merged_numpy(path, dtype: str) -> tuple[ModelConfig, dict]:
  """A checkpoint's parameters as host arrays of `dtype`, LoRA adapters merged into the base weights
  (the base they were trained on, unquantized: the checkpoint it was read from)."""
  cfg = params_lib.load_model_config(path)
  pointer = params_lib.load_base_pointer(path)
  if pointer is None:
    return cfg, params_lib.load_params_numpy(path, cfg, dtype)
  lora = dataclasses.replace(LoraConfig.from_dict(pointer['config']), base_dtype='')
  # Read as stored (its fingerprint is of those values), merged in float32, returned in `dtype`.
  base = load_plain_numpy(pointer['base'], params_lib.load_model_config(pointer['base']))
  check_base(pointer, fingerprint(base), str(path))
  merged = lora_lib.merge(lora_lib.join(base, load_adapters_numpy(path, cfg, lora)), lora)
  return cfg, jax.tree.map(lambda x: x.astype(DTYPES[dtype]), merged)


def load_adapters_numpy(path, cfg: ModelConfig, lora: LoraConfig) -> dict:
  """The adapters of a LoRA checkpoint as float32 host arrays."""
  adapters, _ = lora_lib.split(params_lib.abstract_params(cfg, lora=lora))
  return params_lib.load_params_numpy(path, cfg, 'float32', expected=adapters)

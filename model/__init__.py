"""A LLaMA-family decoder in Flax linen, its weights on disk, and the commands that run it.

Library modules import JAX, Flax and orbax only: never `train/`, nor `data/` (no TensorFlow). Only the
command-line modules (generate, convert, evaluate) use `data/`, for tokenizers and chat templates.
"""

from model.config import PRESETS, ModelConfig, preset
from model.transformer import Transformer, abstract_params, count_params, init_params

"""A LLaMA-family decoder in Flax linen. Imports JAX and Flax only (no TensorFlow)."""

from model.config import PRESETS, ModelConfig, preset
from model.transformer import Transformer

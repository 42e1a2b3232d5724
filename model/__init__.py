"""A LLaMA-family decoder in Flax linen, its weights on disk, and the commands that run it.

Library modules import JAX, Flax and orbax only: never `train/`, nor `data/` (no TensorFlow). Only the
command-line modules (generate, convert, evaluate) use `data/`, for tokenizers and chat templates.
"""

import os

# Before JAX loads: XLA and TensorFlow (the input pipelines) log through one C++ logger whose level is
# read once, when jaxlib loads. Errors only: TensorFlow would otherwise log every bad input record's
# Python traceback twice before the one-line error (runtime/__init__.py). TF_CPP_MIN_LOG_LEVEL=0 shows
# XLA's INFO and WARNING lines again. TF_ENABLE_ONEDNN_OPTS=0: TensorFlow announces its oneDNN kernels
# at import whatever the log level, and the input pipelines do no floating-point math that they
# would speed up. The same defaults are set by data/ and runtime/, whichever loads first.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from model.config import PRESETS, ModelConfig, preset  # pylint: disable=wrong-import-position
from model.transformer import (  # pylint: disable=wrong-import-position
    Transformer, abstract_params, count_params, init_params)

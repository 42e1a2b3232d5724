"""Input pipelines (tf.data). Only `data.tokenizer` is importable without TensorFlow."""

import os

# Before TensorFlow loads, as model/__init__.py explains: its start-up lines (oneDNN, CPU features)
# and INFO logs are left out. TF_CPP_MIN_LOG_LEVEL=0 and TF_ENABLE_ONEDNN_OPTS=1 bring them back.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

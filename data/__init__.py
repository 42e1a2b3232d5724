"""Input pipelines (tf.data). Only `data.tokenizer` is importable without TensorFlow."""

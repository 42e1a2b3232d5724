"""Loads a task's JSONL file from beside its YAML, wherever the command runs (lm-eval resolves
`dataset_kwargs.data_files` against the working directory instead)."""

import os

import datasets

HERE = os.path.dirname(os.path.abspath(__file__))


def load(data_file: str, **metadata):
  """`custom_dataset` of the YAMLs here: lm-eval calls it with the task's dataset_kwargs and its
  metadata (the model's arguments among them), which a local file does not need."""
  del metadata
  return datasets.load_dataset('json', data_files={'test': os.path.join(HERE, data_file)})

"""The `data` section of every config: its keys, their defaults, and the values they may take.

configs/default.py puts this section into every run's config; data.benchmark builds pipelines from it
alone. Importing this module needs ml_collections but not TensorFlow (train.compile reads the formats).
"""

from typing import Any

import ml_collections
from ml_collections import config_dict

# Pretraining documents (data/sources.py), plus batches made up on the spot (data/synthetic.py).
PRETRAIN_FORMATS = ('lines', 'files', 'jsonl', 'parquet', 'tfds', 'synthetic')
# Instruction tuning records (data/sft.py), in JSON/JSONL files or, named *.parquet, Parquet files.
# sharegpt: chat records with ShareGPT's field and role names (data/instructions.py).
SFT_FORMATS = ('alpaca', 'chat', 'sharegpt', 'prompt_completion')
# The formats whose records are conversations (a list of messages), not single prompts.
CHAT_FORMATS = ('chat', 'sharegpt')
# Preference pairs (data/preference.py: prompt, chosen, rejected), for train.dpo; files as for SFT.
PREFERENCE_FORMATS = ('preference',)
UTF8_POLICIES = ('error', 'replace')
OVERLONG_POLICIES = ('truncate', 'drop')


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      format='jsonl',        # pretraining: lines | files | jsonl | parquet | tfds | synthetic; SFT: see
                             # SFT_FORMATS; preference tuning (train.dpo): preference
      train_files='',        # comma-separated paths or globs, local or gs://
      eval_files='',
      text_field='text',     # JSONL field / Parquet column / TFDS feature holding the text
      tfds_name='',
      tfds_data_dir='',
      tfds_train_split='train',
      tfds_eval_split='validation',
      tokenizer='',          # SentencePiece .model, HF tokenizer.json, or a folder holding one
      add_bos=True,
      add_eos=True,
      shuffle_buffer=1000,   # documents
      seed=0,
      invalid_utf8='error',  # error (naming file and byte offset) | replace (and count)
      max_record_bytes=16 << 20,  # a larger record (line, or file in "files" format) is bad input
      skip_bad_records=False,  # False: stop at the first bad record; True: skip and count them
      # Instruction tuning (train.sft) only:
      # A built-in name (llama2, llama3, llama3.1, mistral, mistral-v3, chatml, qwen2.5, alpaca),
      # 'tokenizer' (the template in the tokenizer's folder) or a .jinja file; '': the tokenizer
      # folder's own template if it has one, else llama2 (data/chat.py).
      chat_template='',
      chat_template_name='',   # with 'tokenizer': which of the folder's named templates ('': default)
      chat_template_kwargs='',  # extra template variables, a JSON object: '{"date_string": "01 Jan 2025"}'
      chat_per_turn=False,     # one example per assistant message (templates that re-render earlier turns)
      fields=ml_collections.ConfigDict(dict(  # field names in the records
          instruction='instruction', input='input', output='output', messages='messages',
          role='role', content='content', prompt='prompt', completion='completion',
          chosen='chosen', rejected='rejected')),
      # Role renames inside messages, comma-separated NAME=ROLE: 'human=user,gpt=assistant' ('': none;
      # format sharegpt has those two already). Roles left unnamed stay as they are.
      roles='',
      packing=True,          # several examples (preference pairs) per row; False: one per row, padded
      overlong='truncate',   # examples longer than seq_len: truncate | drop (counted either way)
      # Preference pairs: a longer prompt is cut to its last max_prompt_len tokens (overlong='truncate')
      # or its pair dropped ('drop'), counted either way; 0: only seq_len limits a pair.
      max_prompt_len=0,
      eval_fraction=0.0,     # without eval_files, hold out this share of train records
      # Weighted sources instead of train_files/eval_files: {name: source(weight, ...)} (data/mixture.py).
      mixture=ml_collections.ConfigDict(),
  ))


# The keys a mixture source may set for itself; the others (tokenizer, seed, chat template, packing,
# add_bos/eos) belong to the whole pipeline.
SOURCE_KEYS = ('format', 'train_files', 'eval_files', 'text_field', 'tfds_name', 'tfds_data_dir',
               'tfds_train_split', 'tfds_eval_split', 'shuffle_buffer', 'invalid_utf8',
               'max_record_bytes', 'skip_bad_records', 'fields', 'roles', 'overlong', 'eval_fraction',
               'max_prompt_len')


def source(weight: float, **keys: Any) -> ml_collections.ConfigDict:
  """One entry of `data.mixture`: its weight and the data keys it sets. Every key of SOURCE_KEYS is
  present (None: the value of `data`), so that any of them can be set from the command line, e.g.
  `--config.data.mixture.web.text_field=content`."""
  defaults = get_config()
  unknown = sorted(set(keys) - set(SOURCE_KEYS))
  if unknown:
    raise ValueError(f'a mixture source cannot set {unknown}; it may set {SOURCE_KEYS}')
  spec = ml_collections.ConfigDict({'weight': float(weight)})
  for key in SOURCE_KEYS:
    if key == 'fields':
      spec.fields = ml_collections.ConfigDict({
          name: config_dict.placeholder(str) for name in defaults.fields})
      spec.fields.update(keys.get('fields', {}))
    else:
      spec[key] = config_dict.placeholder(type(defaults[key]))
      if key in keys:
        spec[key] = keys[key]
  return spec

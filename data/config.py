"""The `data` section of every config: its keys, their defaults, and the values they may take.

configs/default.py puts this section into every run's config; data.benchmark builds pipelines from it
alone. Importing this module needs ml_collections but not TensorFlow (train.compile reads the formats).
"""

import ml_collections

# Pretraining documents (data/sources.py), plus batches made up on the spot (data/synthetic.py).
PRETRAIN_FORMATS = ('lines', 'files', 'jsonl', 'tfds', 'synthetic')
# Instruction tuning records (data/sft.py).
SFT_FORMATS = ('alpaca', 'chat', 'prompt_completion')
UTF8_POLICIES = ('error', 'replace')
OVERLONG_POLICIES = ('truncate', 'drop')


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      format='jsonl',        # pretraining: lines | files | jsonl | tfds | synthetic; SFT: see SFT_FORMATS
      train_files='',        # comma-separated paths or globs, local or gs://
      eval_files='',
      text_field='text',     # JSONL field / TFDS feature holding the text
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
      chat_template='llama2',  # llama2 | llama3 | chatml | mistral | alpaca (data/chat.py)
      fields=ml_collections.ConfigDict(dict(  # field names in the records
          instruction='instruction', input='input', output='output', messages='messages',
          role='role', content='content', prompt='prompt', completion='completion')),
      packing=True,          # several examples per row; False: one example per row, padded
      overlong='truncate',   # examples longer than seq_len: truncate | drop (counted either way)
      eval_fraction=0.0,     # without eval_files, hold out this share of train records
  ))

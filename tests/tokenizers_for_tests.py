"""Small tokenizers of both kinds, trained locally on Python's own help text (no downloads)."""

import json
import os

SPECIALS = ['<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>', '<|end_header_id|>',
            '<|eot_id|>', '<|im_start|>', '<|im_end|>', '<|endoftext|>']


def corpus(n_topics: int = 40) -> list[str]:
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  return list(topics.topics.values())[:n_topics]


def make_hf_tokenizer(folder, vocab_size: int = 400, style: str = 'llama3', config: bool = True) -> str:
  """A byte-level BPE `tokenizer.json` (as Llama 3 and Qwen use) in `folder`; returns the folder.

  style 'llama3': BOS <|begin_of_text|> added by the post-processor, EOS <|end_of_text|>.
  style 'qwen': no BOS (tokenizer_config.json says bos_token null), EOS <|endoftext|>.
  With `config`, a tokenizer_config.json naming them is written beside it.
  """
  from data.tokenizer import train_bpe  # pylint: disable=import-outside-toplevel
  if style == 'llama3':
    bos, eos = '<|begin_of_text|>', '<|end_of_text|>'
    declared = {'bos_token': bos, 'eos_token': eos}
  elif style == 'qwen':
    bos, eos = '', '<|endoftext|>'
    declared = {'bos_token': None, 'eos_token': {'content': eos, 'special': True}}
  else:
    raise ValueError(style)
  path = os.path.join(folder, 'tokenizer.json')
  train_bpe(corpus(), path, vocab_size, SPECIALS, bos_token=bos, eos_token=eos)
  if config:
    with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
      json.dump(declared, f)
  else:
    os.remove(os.path.join(folder, 'tokenizer_config.json'))
  return str(folder)


def make_sp_tokenizer(path, vocab_size: int = 400) -> str:
  """A Llama-2 style SentencePiece model (unk 0, bos 1, eos 2, byte fallback) with the chat specials."""
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  prefix = str(path)[:-len('.model')]
  spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_prefix=prefix,
                                 vocab_size=vocab_size, user_defined_symbols=SPECIALS,
                                 byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                 normalization_rule_name='identity', remove_extra_whitespaces=False,
                                 allow_whitespace_only_pieces=True, minloglevel=2)
  return str(path)

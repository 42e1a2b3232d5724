"""Small tokenizers of both kinds, trained locally on Python's own help text (no downloads)."""

import json
import os

SPECIALS = ['<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>', '<|end_header_id|>',
            '<|eot_id|>', '<|im_start|>', '<|im_end|>', '<|endoftext|>']

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def corpus(n_topics: int = 40) -> list[str]:
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  return list(topics.topics.values())[:n_topics]


def make_hf_tokenizer(folder, vocab_size: int = 400, style: str = 'llama3', config: bool = True) -> str:
  """A byte-level BPE `tokenizer.json` (as Llama 3 and Qwen use) in `folder`; returns the folder.

  style 'llama3': BOS <|begin_of_text|> added by the post-processor, EOS <|end_of_text|>.
  style 'qwen': no BOS (tokenizer_config.json says bos_token null), EOS <|endoftext|>.
  With `config`, a tokenizer_config.json naming them is written beside it.
  """
  from tokenizers import (  # pylint: disable=import-outside-toplevel
      Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers)
  tok = Tokenizer(models.BPE())
  # Llama 3's pre-tokenizer: its split pattern, then bytes to printable characters.
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior='isolated'),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(corpus(), trainer)
  if style == 'llama3':
    bos = '<|begin_of_text|>'
    tok.post_processor = processors.TemplateProcessing(
        single=f'{bos} $A', pair=f'{bos} $A {bos} $B', special_tokens=[(bos, tok.token_to_id(bos))])
    declared = {'bos_token': bos, 'eos_token': '<|end_of_text|>'}
  elif style == 'qwen':
    declared = {'bos_token': None, 'eos_token': {'content': '<|endoftext|>', 'special': True}}
  else:
    raise ValueError(style)
  os.makedirs(folder, exist_ok=True)
  tok.save(os.path.join(folder, 'tokenizer.json'))
  if config:
    with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
      json.dump(declared, f)
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

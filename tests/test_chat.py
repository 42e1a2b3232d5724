"""Chat templates: the exact token sequence and loss mask of a two-turn chat, for every template."""

import re

import pytest
import sentencepiece as spm

from data import chat
from data.tokenizer import SentencePieceTokenizer

SPECIALS = ['<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>', '<|end_header_id|>',
            '<|eot_id|>', '<|im_start|>', '<|im_end|>']

CHAT = [
    {'role': 'system', 'content': 'Be brief.'},
    {'role': 'user', 'content': 'Name a colour.'},
    {'role': 'assistant', 'content': 'Blue.'},
    {'role': 'user', 'content': 'Another one?'},
    {'role': 'assistant', 'content': 'Green, of course.'},
]


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  prefix = str(tmp_path_factory.mktemp('spm') / 'chat')
  text = iter(list(topics.topics.values())[:40])
  spm.SentencePieceTrainer.train(sentence_iterator=text, model_prefix=prefix, vocab_size=400,
                                 user_defined_symbols=SPECIALS, byte_fallback=True, minloglevel=2)
  return SentencePieceTokenizer(prefix + '.model')


def _expected(tok, pieces):
  """(ids, mask) from ('t', text, trained) / ('s', special, trained) pieces, tokenized one by one."""
  ids, mask = [], []
  for kind, value, trained in pieces:
    if kind == 's':
      piece_ids = [{'bos': tok.bos_id, 'eos': tok.eos_id}.get(value) or tok.token_id(value)]
    else:
      piece_ids = tok.encode(value)
    ids += piece_ids
    mask += [int(trained)] * len(piece_ids)
  return ids, mask


def _check(tok, name, pieces):
  ids, mask = chat.get_template(name).encode(tok, CHAT)
  want_ids, want_mask = _expected(tok, pieces)
  assert ids == want_ids
  assert mask == want_mask
  # The trained tokens are exactly the two answers, each followed by its end-of-turn token.
  trained = [i for i, m in zip(ids, mask) if m]
  end = chat.get_template(name).stop_ids(tok)[0]
  assert trained == tok.encode('Blue.') + [end] + tok.encode('Green, of course.') + [end]


def test_llama2(tok):
  _check(tok, 'llama2', [
      ('s', 'bos', 0), ('t', '[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nName a colour. [/INST]', 0),
      ('t', 'Blue.', 1), ('s', 'eos', 1),
      ('s', 'bos', 0), ('t', '[INST] Another one? [/INST]', 0),
      ('t', 'Green, of course.', 1), ('s', 'eos', 1)])


def test_mistral(tok):
  _check(tok, 'mistral', [
      ('s', 'bos', 0), ('t', '[INST] Be brief.\n\nName a colour. [/INST]', 0),
      ('t', 'Blue.', 1), ('s', 'eos', 1),
      ('t', '[INST] Another one? [/INST]', 0), ('t', 'Green, of course.', 1), ('s', 'eos', 1)])


def test_llama3(tok):
  def turn(role, content, trained):
    return [('s', '<|start_header_id|>', 0), ('t', role, 0), ('s', '<|end_header_id|>', 0),
            ('t', '\n\n', 0), ('t', content, trained), ('s', '<|eot_id|>', trained)]
  _check(tok, 'llama3', [('s', '<|begin_of_text|>', 0)] + turn('system', 'Be brief.', 0)
         + turn('user', 'Name a colour.', 0) + turn('assistant', 'Blue.', 1)
         + turn('user', 'Another one?', 0) + turn('assistant', 'Green, of course.', 1))


def test_chatml(tok):
  def turn(role, content, trained):
    return [('s', '<|im_start|>', 0), ('t', f'{role}\n', 0), ('t', content, trained),
            ('s', '<|im_end|>', trained), ('t', '\n', 0)]
  _check(tok, 'chatml', turn('system', 'Be brief.', 0) + turn('user', 'Name a colour.', 0)
         + turn('assistant', 'Blue.', 1) + turn('user', 'Another one?', 0)
         + turn('assistant', 'Green, of course.', 1))


def test_alpaca(tok):
  _check(tok, 'alpaca', [
      ('s', 'bos', 0), ('t', 'Be brief.\n\n### Instruction:\nName a colour.\n\n### Response:\n', 0),
      ('t', 'Blue.', 1), ('s', 'eos', 1),
      ('t', '\n\n### Instruction:\nAnother one?\n\n### Response:\n', 0),
      ('t', 'Green, of course.', 1), ('s', 'eos', 1)])


@pytest.mark.parametrize('name', sorted(chat.TEMPLATES))
def test_generation_prompt_is_the_training_prefix(tok, name):
  """What the model sees at generation time is exactly what preceded the answer in training."""
  template = chat.get_template(name)
  ids, mask = template.encode(tok, CHAT[:3])
  prompt = template.prompt_ids(tok, CHAT[:2])
  assert ids[:len(prompt)] == prompt
  assert mask[:len(prompt)] == [0] * len(prompt) and mask[len(prompt)] == 1


@pytest.mark.parametrize('messages,error', [
    ([{'role': 'user', 'content': 'hi'}, {'role': 'robot', 'content': 'x'}], "unknown role 'robot'"),
    ([{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': '  '}], 'empty assistant answer'),
    ([{'role': 'assistant', 'content': 'x'}], "'assistant' where 'user' was expected"),
    ([{'role': 'user', 'content': 'hi'}], 'no assistant message'),
])
def test_bad_conversations(tok, messages, error):
  with pytest.raises(chat.ChatFormatError, match=error):
    chat.get_template('llama2').encode(tok, messages)


def test_missing_special_token_is_named(tmp_path):
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  prefix = str(tmp_path / 'plain')
  spm.SentencePieceTrainer.train(sentence_iterator=iter(list(topics.topics.values())[:20]),
                                 model_prefix=prefix, vocab_size=300, minloglevel=2)
  with pytest.raises(chat.ChatFormatError, match=re.escape("needs the special token '<|im_start|>'")):
    chat.get_template('chatml').encode(SentencePieceTokenizer(prefix + '.model'), CHAT)

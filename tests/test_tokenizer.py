"""Both tokenizer kinds behind one interface: SentencePiece `.model` and Hugging Face `tokenizer.json`,
picked by file type, with BOS/EOS from tokenizer_config.json or well-known names, working with the
chat templates, and rejected when larger than the model's vocabulary."""

import json

import pytest

from data import chat
from data.tokenizer import (HuggingFaceTokenizer, SentencePieceTokenizer, check_vocab,
                            load_tokenizer)
from tests.tokenizers_for_tests import make_hf_tokenizer, make_sp_tokenizer

pytestmark = pytest.mark.unit

CHAT = [
    {'role': 'system', 'content': 'Be brief.'},
    {'role': 'user', 'content': 'What does a for statement do?'},
    {'role': 'assistant', 'content': 'It iterates over the items of a sequence.'},
    {'role': 'user', 'content': 'And while?'},
    {'role': 'assistant', 'content': 'It repeats while a condition holds, e.g. `while x > 0:`.'},
]
TEXT = 'The for statement is used to iterate over the elements of a sequence (such as 1234).\n\n  ok'


@pytest.fixture(scope='module')
def llama3_dir(tmp_path_factory):
  return make_hf_tokenizer(tmp_path_factory.mktemp('llama3'), style='llama3')


@pytest.fixture(scope='module')
def sp_path(tmp_path_factory):
  return make_sp_tokenizer(tmp_path_factory.mktemp('spm') / 'tokenizer.model')


def test_hf_tokenizer_follows_the_interface(llama3_dir):
  tok = load_tokenizer(llama3_dir)  # a folder holding tokenizer.json
  assert isinstance(tok, HuggingFaceTokenizer)
  assert load_tokenizer(llama3_dir + '/tokenizer.json').vocab_size == tok.vocab_size == 400
  assert (tok.bos_id, tok.eos_id) == (tok.token_id('<|begin_of_text|>'), tok.token_id('<|end_of_text|>'))
  assert tok.add_bos  # its post-processor adds <|begin_of_text|>, like Llama 3's
  ids = tok.encode(TEXT)
  assert tok.bos_id not in ids and tok.eos_id not in ids  # no special tokens added
  assert tok.decode(ids) == TEXT
  assert tok.encode_batch([TEXT, 'x']) == [ids, tok.encode('x')]
  assert tok.token_id('<|eot_id|>') is not None and tok.token_id('<|no such token|>') is None


def test_well_known_names_without_tokenizer_config(tmp_path):
  tok = load_tokenizer(make_hf_tokenizer(tmp_path, style='llama3', config=False))
  assert (tok.bos_id, tok.eos_id) == (tok.token_id('<|begin_of_text|>'), tok.token_id('<|end_of_text|>'))


def test_qwen_style_tokenizer_has_no_bos(tmp_path):
  tok = load_tokenizer(make_hf_tokenizer(tmp_path, style='qwen'))
  assert tok.eos_id == tok.token_id('<|endoftext|>')
  assert tok.bos_id == tok.eos_id and not tok.add_bos
  template = chat.load_template('chatml', tok)
  [(ids, mask, *_)] = template.examples(CHAT)
  assert ids[0] == tok.token_id('<|im_start|>')
  assert template.stop_ids == [tok.token_id('<|im_end|>'), tok.eos_id]
  assert 'bos_token' not in tok.special_tokens_map
  trained = [i for i, m in zip(ids, mask) if m]
  end = tok.token_id('<|im_end|>')
  assert trained == (tok.encode(CHAT[2]['content']) + [end] + tok.encode(CHAT[4]['content']) + [end])


@pytest.mark.parametrize('template,rendered', [
    ('llama3', '<|begin_of_text|>' + ''.join(
        f'<|start_header_id|>{m["role"]}<|end_header_id|>\n\n{m["content"]}<|eot_id|>' for m in CHAT)),
    ('chatml', ''.join(f'<|im_start|>{m["role"]}\n{m["content"]}<|im_end|>\n' for m in CHAT)),
])
def test_templates_with_hf_tokenizer_equal_tokenizing_the_rendered_text(llama3_dir, template,
                                                                       rendered):
  """A rendered conversation gets the ids that the tokenizer itself gives it (special tokens recognised
  in the text), as Hugging Face's apply_chat_template does (compared with it in tests/test_chat.py)."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  tok = load_tokenizer(llama3_dir)
  [(ids, mask, *_)] = chat.load_template(template, tok).examples(CHAT)
  reference = tokenizers.Tokenizer.from_file(tok.path)  # recognises special tokens written as text
  assert ids == reference.encode(rendered, add_special_tokens=False).ids
  end = chat.load_template(template, tok).stop_ids[0]
  trained = [i for i, m in zip(ids, mask) if m]
  assert trained == (tok.encode(CHAT[2]['content']) + [end] + tok.encode(CHAT[4]['content']) + [end])


def test_sentencepiece_by_file_or_folder(sp_path, tmp_path):
  tok = load_tokenizer(sp_path)
  assert isinstance(tok, SentencePieceTokenizer) and tok.add_bos
  assert isinstance(load_tokenizer(str(tmp_path.parent / sp_path.split('/')[-2])), SentencePieceTokenizer)
  assert (tok.bos_id, tok.eos_id) == (1, 2)
  assert tok.decode(tok.encode(TEXT)) == TEXT
  for name in ('llama2', 'mistral', 'llama3', 'chatml'):
    [(ids, mask, *_)] = chat.load_template(name, tok).examples(CHAT)
    assert sum(mask) > 10 and len(ids) == len(mask)


def test_errors_are_explicit(tmp_path, llama3_dir):
  with pytest.raises(FileNotFoundError, match='neither tokenizer.json nor tokenizer.model'):
    load_tokenizer(str(tmp_path))
  (tmp_path / 'vocab.txt').write_text('a\n')
  with pytest.raises(ValueError, match='expected a SentencePiece .model file or a Hugging Face'):
    load_tokenizer(str(tmp_path / 'vocab.txt'))
  with pytest.raises(FileNotFoundError):
    load_tokenizer(str(tmp_path / 'missing.model'))
  # A tokenizer_config.json naming a token the vocabulary lacks.
  bad = tmp_path / 'bad'
  make_hf_tokenizer(bad, style='llama3')
  (bad / 'tokenizer_config.json').write_text(json.dumps({'eos_token': '<|nope|>'}))
  with pytest.raises(ValueError, match="names eos_token '<\\|nope\\|>'"):
    load_tokenizer(str(bad))
  # No tokenizer_config.json and no well-known EOS name.
  from tokenizers import Tokenizer, models, trainers  # pylint: disable=import-outside-toplevel
  plain = Tokenizer(models.WordLevel(unk_token='[UNK]'))
  plain.train_from_iterator(['a b c'], trainers.WordLevelTrainer(special_tokens=['[UNK]']))
  (tmp_path / 'plain').mkdir()
  plain.save(str(tmp_path / 'plain' / 'tokenizer.json'))
  with pytest.raises(ValueError, match='cannot tell the EOS token'):
    load_tokenizer(str(tmp_path / 'plain'))
  # More ids than the model has embeddings.
  tok = load_tokenizer(llama3_dir)
  check_vocab(tok, 400)
  with pytest.raises(ValueError, match='has 400 tokens but the model.s vocabulary is only 399'):
    check_vocab(tok, 399)


def test_special_token_text_in_content_stays_text(llama3_dir):
  """A user who types "<|im_end|>" does not end the turn: only templates insert control tokens."""
  tok = load_tokenizer(llama3_dir)
  for special in ('<|im_end|>', '<|eot_id|>'):
    assert tok.token_id(special) is not None
    assert tok.token_id(special) not in tok.encode(f'before {special} after')
  messages = [{'role': 'user', 'content': 'say <|im_end|>'}, {'role': 'assistant', 'content': 'no'}]
  [(ids, mask, *_)] = chat.load_template('chatml', tok).examples(messages)
  assert ids.count(tok.token_id('<|im_end|>')) == 2  # the two real turn ends


def _same_ids_in_transformers(tok, folder):
  transformers = pytest.importorskip('transformers', reason='transformers is not installed (the '
                                     'newest-releases set on Python 3.12 has no torch)')
  reference = transformers.AutoTokenizer.from_pretrained(folder)
  for text in (TEXT, 'naïve café, 東京 — ünïcödé 🙂', '  leading spaces\tand\ttabs\r\n', 'x' * 50):
    assert tok.decode(tok.encode(text)) == text  # byte level: no unknown token
    assert reference(text).input_ids == [tok.bos_id] * tok.add_bos + tok.encode(text)
  return reference


@pytest.mark.e2e
@pytest.mark.parity
def test_trained_bpe_tokenizer_loads_here_and_in_transformers(tmp_path):
  """`python -m data.tokenizer --kind bpe` on Parquet input: a Llama 3 style tokenizer.json with the
  chat templates' tokens, which this project and transformers load alike; and a Qwen style one (no
  BOS)."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  from data.tokenizer import train_bpe  # pylint: disable=import-outside-toplevel
  from tests.cli import run_cli  # pylint: disable=import-outside-toplevel
  from tests.tokenizers_for_tests import corpus  # pylint: disable=import-outside-toplevel
  pq.write_table(pa.table({'text': corpus(60)}), tmp_path / 'corpus.parquet', row_group_size=16)
  out = tmp_path / 'tok' / 'tokenizer.json'
  proc = run_cli('data.tokenizer', '--kind=bpe', f'--input={tmp_path / "corpus.parquet"}', '--format=parquet',
                 '--vocab_size=700', '--special_tokens=llama3,chatml,<|pad|>', f'--out={out}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  tok = load_tokenizer(str(out.parent))
  assert isinstance(tok, HuggingFaceTokenizer) and tok.vocab_size == 700 and tok.add_bos
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == tuple(
      tok.token_id(t) for t in ('<|begin_of_text|>', '<|end_of_text|>', '<|pad|>'))
  specials = ['<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>', '<|end_header_id|>',
              '<|eot_id|>', '<|im_start|>', '<|im_end|>', '<|pad|>']
  assert sorted(tok.token_id(t) for t in specials) == list(range(700 - 8, 700))  # the last, as in Llama 3
  for name in ('llama3', 'chatml'):
    template = chat.load_template(name, tok)
    [(ids, mask, *_)] = template.examples(CHAT)
    assert template.stop_ids[0] in ids and sum(mask) > 10
  reference = _same_ids_in_transformers(tok, out.parent)
  assert (reference.bos_token, reference.eos_token) == ('<|begin_of_text|>', '<|end_of_text|>')
  qwen = train_bpe(corpus(60), str(tmp_path / 'qwen' / 'tokenizer.json'), 500, ['<|im_start|>', '<|im_end|>'],
                   bos_token='', eos_token='<|endoftext|>')
  assert qwen.vocab_size == 500 and not qwen.add_bos and qwen.bos_id == qwen.eos_id == qwen.token_id(
      '<|endoftext|>')
  assert _same_ids_in_transformers(qwen, tmp_path / 'qwen').bos_token is None

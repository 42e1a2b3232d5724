"""Chat templates against transformers 5.23's apply_chat_template: token ids, loss masks (its
`return_assistant_tokens_mask` on `{% generation %}` spans) and prompts, for every built-in template and
for templates written here, on both tokenizer kinds; the renderings of the published formats; what is
trained; special-token text in messages; loading templates; bad input; `python -m data.chat`."""

import json
import os
import re
import shutil

import pytest
import sentencepiece as spm

from data import chat
from data.tokenizer import load_tokenizer
from tests.cli import run_cli
from tests.tokenizers_for_tests import SPECIALS, corpus, make_hf_tokenizer

transformers = pytest.importorskip('transformers')
transformers.logging.set_verbosity_error()

pytestmark = [pytest.mark.unit, pytest.mark.parity]

S = lambda c: {'role': 'system', 'content': c}
U = lambda c: {'role': 'user', 'content': c}
A = lambda c: {'role': 'assistant', 'content': c}
CHAT = [S('Be brief.'), U('Name a colour.'), A('Blue.'), U('Another one?'), A('Green, of course.')]
CONVERSATIONS = [
    [U('Name a colour.'), A('Blue.')],
    CHAT,
    [S('  Be brief. \n'), U(' Hi  \n'), A('\n Hello there!  ')],  # surrounding whitespace
    [U('Café? 日本語 😀'), A('Ça va — très bien 🎉')],
    [S(''), U('Hi'), A('Yo')],  # empty system message
    [S('You answer in\ntwo lines.'), U('What is a tuple?'), A('An immutable\nsequence.')],
    [U('One'), A('1'), U('Two'), A('2'), U('Three'), A('3')],
    [U('Show code:\n```py\nfor x in y:\n\tprint(x)\n```'), A('It prints\teach item.\n\n```\nok\n```')],
    [U('Explain generators.'), A('A generator function returns an iterator, one value per yield. ' * 5)],
    [U('<b>bold</b> & "quotes"'), A('{{ not jinja }} {% raw %} \\n')],
    [U('What is 2+2?'), A(' 4.')],
    [S('\n'), U('\n\nq\n'), A('\n\na\n')],
]


# --------------------------------------------------------------------------------------------------
# Tokenizers of both kinds, each with its transformers twin (built once for the module)

@pytest.fixture(scope='module')
def tokenizers(tmp_path_factory):
  """{kind: (our tokenizer, transformers tokenizer)}: SentencePiece (transformers' LlamaTokenizer, with
  legacy False and True), a Llama-style tokenizer.json (its normalizer is replaced by transformers),
  and byte-level tokenizer.json files with and without a BOS (Llama 3, Qwen)."""
  from tokenizers import Tokenizer, normalizers  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp('chat_tokenizers')
  sp = root / 'sp'
  sp.mkdir()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus()), model_prefix=str(sp / 'tokenizer'), vocab_size=600, model_type='bpe',
      byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, control_symbols=['[INST]', '[/INST]'],
      user_defined_symbols=SPECIALS, normalization_rule_name='identity', remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True, split_digits=True, minloglevel=2)
  llama = {'tokenizer_class': 'LlamaTokenizer', 'bos_token': '<s>', 'eos_token': '</s>', 'unk_token': '<unk>'}
  (sp / 'tokenizer_config.json').write_text(json.dumps({**llama, 'legacy': False}))
  legacy = root / 'sp_legacy'
  legacy.mkdir()
  shutil.copy(sp / 'tokenizer.model', legacy)
  (legacy / 'tokenizer_config.json').write_text(json.dumps({**llama, 'legacy': True}))
  # A tokenizer.json as Llama 2's on the Hub: a Prepend("▁") normalizer, no pre-tokenizer.
  llama_json = root / 'llama_json'
  transformers.AutoTokenizer.from_pretrained(sp).save_pretrained(llama_json)
  for name in os.listdir(llama_json):
    if name.endswith('.model'):
      os.remove(llama_json / name)
  raw = Tokenizer.from_file(str(llama_json / 'tokenizer.json'))
  raw.pre_tokenizer = None
  raw.normalizer = normalizers.Sequence([normalizers.Prepend('▁'), normalizers.Replace(' ', '▁')])
  raw.save(str(llama_json / 'tokenizer.json'))
  hf = make_hf_tokenizer(root / 'hf', style='llama3')
  qwen = make_hf_tokenizer(root / 'qwen', style='qwen')
  auto = transformers.AutoTokenizer.from_pretrained
  return {
      'sp': (load_tokenizer(str(sp / 'tokenizer.model')), auto(sp)),
      'sp_legacy': (load_tokenizer(str(legacy)), auto(legacy)),
      'llama_json': (load_tokenizer(str(llama_json)), auto(llama_json)),
      'hf': (load_tokenizer(hf), auto(hf)),
      'qwen': (load_tokenizer(qwen), transformers.PreTrainedTokenizerFast(
          tokenizer_file=f'{qwen}/tokenizer.json', eos_token='<|endoftext|>')),
  }


KINDS = ('sp', 'sp_legacy', 'llama_json', 'hf', 'qwen')
# mistral-v3 needs [INST] and [/INST] as control tokens, which only the SentencePiece models have;
# llama2 needs a BOS token, which the Qwen one lacks (as with Meta's template, an error, see below).
CASES = [(name, kind) for name in chat.BUILTIN for kind in KINDS
         if (name != 'mistral-v3' or kind in ('sp', 'sp_legacy', 'llama_json'))
         and (name, kind) != ('llama2', 'qwen')]


def _reference(ref, source, messages, **kwargs):
  out = ref.apply_chat_template(messages, chat_template=source, return_dict=True,
                                return_assistant_tokens_mask=chat._GENERATION_TAG.search(source) is not None,
                                **kwargs)
  return out['input_ids'], out.get('assistant_masks')


def _check_parity(template, ref, conversations, **kwargs):
  """Our ids, masks and prompts equal transformers' on every conversation."""
  for messages in conversations:
    [example] = template.examples(messages)
    ids, mask = _reference(ref, template.source, messages, **kwargs)
    assert example.ids == ids, messages
    assert example.mask == mask, messages
    assert sum(mask) > 0
    prompt = ref.apply_chat_template(messages[:-1], chat_template=template.source, add_generation_prompt=True,
                                     return_dict=False, **kwargs)
    assert template.prompt_ids(messages[:-1]) == prompt, messages


@pytest.mark.parametrize('name,kind', CASES)
def test_builtin_templates_match_transformers(tokenizers, name, kind):
  ours, ref = tokenizers[kind]
  _check_parity(chat.load_template(name, ours), ref, CONVERSATIONS)


def _trained(example):
  return re.findall('⟦(.*?)⟧', example.show(), re.S)


# The published formats, for CHAT (system + two turns), written out by hand; what each trains.
RENDERED = {
    'llama2': ('<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nName a colour. [/INST] Blue. </s>'
               '<s>[INST] Another one? [/INST] Green, of course. </s>',
               [' Blue. </s>', ' Green, of course. </s>']),
    'mistral': ('<s> [INST] Be brief.\n\nName a colour. [/INST] Blue.</s> [INST] Another one? [/INST] '
                'Green, of course.</s>', [' Blue.</s>', ' Green, of course.</s>']),
    # The system prompt only goes into a conversation that ends with a user message (a prompt).
    'mistral-v3': ('<s>[INST] Name a colour.[/INST] Blue.</s>[INST] Another one?[/INST] '
                   'Green, of course.</s>',
                   [' Blue.</s>', ' Green, of course.</s>']),
    'alpaca': ('<s>Be brief.\n\n### Instruction:\nName a colour.\n\n### Response:\nBlue.</s>\n\n### '
               'Instruction:\nAnother one?\n\n### Response:\nGreen, of course.</s>',
               ['Blue.</s>', 'Green, of course.</s>']),
    'llama3': ('<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>'
               '<|start_header_id|>user<|end_header_id|>\n\nName a colour.<|eot_id|>'
               '<|start_header_id|>assistant<|end_header_id|>\n\nBlue.<|eot_id|>'
               '<|start_header_id|>user<|end_header_id|>\n\nAnother one?<|eot_id|>'
               '<|start_header_id|>assistant<|end_header_id|>\n\nGreen, of course.<|eot_id|>',
               ['Blue.<|eot_id|>', 'Green, of course.<|eot_id|>']),
    'llama3.1': ('<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: '
                 'December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>'
                 '<|start_header_id|>user<|end_header_id|>\n\nName a colour.<|eot_id|>'
                 '<|start_header_id|>assistant<|end_header_id|>\n\nBlue.<|eot_id|>'
                 '<|start_header_id|>user<|end_header_id|>\n\nAnother one?<|eot_id|>'
                 '<|start_header_id|>assistant<|end_header_id|>\n\nGreen, of course.<|eot_id|>',
                 ['Blue.<|eot_id|>', 'Green, of course.<|eot_id|>']),
    'chatml': ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n'
               '<|im_start|>assistant\nBlue.<|im_end|>\n<|im_start|>user\nAnother one?<|im_end|>\n'
               '<|im_start|>assistant\nGreen, of course.<|im_end|>\n',
               ['Blue.<|im_end|>', 'Green, of course.<|im_end|>']),
    'qwen2.5': ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n'
                '<|im_start|>assistant\nBlue.<|im_end|>\n<|im_start|>user\nAnother one?<|im_end|>\n'
                '<|im_start|>assistant\nGreen, of course.<|im_end|>\n',
                ['Blue.<|im_end|>', 'Green, of course.<|im_end|>']),
}
# Details of the published formats: whitespace, empty and missing system prompts, prompts.
DETAILS = [
    ('llama2', [S(''), U(' Hi  \n'), A('\n Yo ')], False,
     '<s>[INST] <<SYS>>\n\n<</SYS>>\n\n Hi [/INST] Yo </s>'),
    ('llama2', [U('Hi')], True, '<s>[INST] Hi [/INST]'),
    ('mistral', [S(''), U(' Hi '), A(' Yo ')], False, '<s> [INST] \n\n Hi  [/INST]  Yo </s>'),
    ('mistral-v3', [S('Be brief.'), U('Hi')], True, '<s>[INST] Be brief.\n\nHi[/INST]'),
    ('mistral-v3', [U(' Hi  \n'), A('\n Hello!  ')], False, '<s>[INST]  Hi  \n[/INST] Hello!</s>'),
    ('llama3', [S(''), U(' Hi ')], True, '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n'
     '<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>'
     '<|start_header_id|>assistant<|end_header_id|>\n\n'),
    ('llama3.1', [U('Hi')], True, '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting '
     'Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user'
     '<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n'),
    ('chatml', [U(' Hi ')], True, '<|im_start|>user\n Hi <|im_end|>\n<|im_start|>assistant\n'),
    ('qwen2.5', [U(' Hi ')], True, '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a '
     'helpful assistant.<|im_end|>\n<|im_start|>user\n Hi <|im_end|>\n<|im_start|>assistant\n'),
    ('qwen2.5', [S(''), U('Hi')], False, '<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n'),
    ('alpaca', [U('Add 2 and 3')], True, '<s>Below is an instruction that describes a task. Write a response '
     'that appropriately completes the request.\n\n### Instruction:\nAdd 2 and 3\n\n### Response:\n'),
]


@pytest.mark.parametrize('name', sorted(RENDERED))
def test_builtin_templates_render_the_published_formats(tokenizers, name):
  tok = tokenizers['hf' if name.startswith(('llama3', 'chatml', 'qwen')) else 'sp'][0]
  template = chat.load_template(name, tok)
  text, trained = RENDERED[name]
  assert template.render(CHAT) == text
  assert _trained(template.examples(CHAT)[0]) == trained
  for detail_name, messages, prompt, rendered in DETAILS:
    if detail_name == name:
      assert template.render(messages, add_generation_prompt=prompt) == rendered


def test_end_of_turn_tokens_are_the_stop_ids(tokenizers):
  sp, hf = tokenizers['sp'][0], tokenizers['hf'][0]
  assert chat.load_template('llama2', sp).stop_ids == [sp.eos_id]
  assert chat.load_template('mistral-v3', sp).stop_ids == [sp.eos_id]
  assert chat.load_template('llama3', hf).stop_ids == [hf.token_id('<|eot_id|>'), hf.eos_id]
  assert chat.load_template('chatml', hf).stop_ids == [hf.token_id('<|im_end|>'), hf.eos_id]


def test_generation_prompt_is_the_training_prefix(tokenizers):
  """What the model sees at generation time is exactly what preceded the answer in training."""
  for name, kind in CASES:
    template = chat.load_template(name, tokenizers[kind][0])
    messages = CHAT[1:3] if name == 'mistral-v3' else CHAT[:3]  # (its system prompt: see RENDERED)
    example, prompt = template.examples(messages)[0], template.prompt_ids(messages[:-1])
    assert example.ids[:len(prompt)] == prompt, (name, kind)
    assert example.mask[:len(prompt)] == [0] * len(prompt) and example.mask[len(prompt)] == 1


def test_llama31_date_is_a_template_variable(tokenizers):
  ours, ref = tokenizers['hf']
  template = chat.load_template('llama3.1', ours, variables={'date_string': '01 Jan 2025'})
  assert 'Today Date: 01 Jan 2025\n\n' in template.render(CHAT)
  _check_parity(template, ref, CONVERSATIONS[:3], date_string='01 Jan 2025')
  # Exported, the date is part of the template itself.
  standalone = template.standalone_source()
  assert ref.apply_chat_template(CHAT, chat_template=standalone, tokenize=False) == template.render(CHAT)


# --------------------------------------------------------------------------------------------------
# Templates written for the tests: other shapes, with and without {% generation %}

ZEPHYR = """{{- bos_token -}}
{%- for message in messages -%}
  {%- if message.role not in ['system', 'user', 'assistant'] -%}
    {{- raise_exception('roles: ' + (['system', 'user', 'assistant'] | tojson)) -}}
  {%- endif -%}
  {{- '<|' + message.role + '|>\\n' -}}
  {%- if message.role == 'assistant' -%}
    {%- generation -%}{{- message.content | trim + eos_token -}}{%- endgeneration -%}
  {%- else -%}
    {{- message.content + eos_token -}}
  {%- endif -%}
  {{- '\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt %}<|assistant|>
{% endif -%}
{#- a year, to check strftime_now: -#}
{%- if strftime_now('%Y') | int < 2000 %}{{ raise_exception('clock') }}{% endif %}"""
# Block style, loop controls, a namespace; the answer's end of turn is <|eot_id|> after a space.
BLOCKS = """{%- set ns = namespace(turn=0) %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {%- if not message['content'] %}{% continue %}{% endif %}
{{ '[SYS] ' + message['content'] }}
    {%- elif message['role'] == 'user' %}
        {%- set ns.turn = ns.turn + 1 %}
{{ '\\nQ' + ns.turn | string + ': ' + message['content'] }}
    {%- else %}
{{ '\\nA: ' }}
        {%- generation %}
            {{- message['content'] + ' <|eot_id|>' }}
        {%- endgeneration %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '\\nA: ' }}{% endif %}"""
# Not prefix-stable: earlier answers lose their reasoning, as Qwen3's and DeepSeek-R1's templates do.
REASONING = """{%- for message in messages -%}
  {%- set content = message['content'] -%}
  {%- if message['role'] == 'assistant' and not loop.last -%}
    {%- set content = content.split('</think>')[-1] | trim -%}
  {%- endif -%}
  {{- '<|im_start|>' + message['role'] + '\\n' -}}
  {%- if message['role'] == 'assistant' -%}
    {%- generation -%}{{- content + '<|im_end|>' -}}{%- endgeneration -%}{{- '\\n' -}}
  {%- else -%}
    {{- content + '<|im_end|>\\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"""
THINKING = [U('What is 2+3?'), A('<think>2+3=5</think>\n\n5'), U('And 2+4?'), A('<think>2+4=6</think>\n\n6')]


def _without_generation(source):
  return re.sub(r'\{%-?\s*(end)?generation\s*-?%\}', '', source)


@pytest.mark.parametrize('source', [ZEPHYR, BLOCKS], ids=['zephyr', 'blocks'])
@pytest.mark.parametrize('kind', ['sp', 'hf'])
def test_templates_with_and_without_generation_blocks(tokenizers, source, kind):
  """With {% generation %}, our masks are transformers'; without, the per-message spans give the same."""
  ours, ref = tokenizers[kind]
  _check_parity(chat.ChatTemplate(source, 'test', ours), ref, CONVERSATIONS)
  plain = chat.ChatTemplate(_without_generation(source), 'test (no generation blocks)', ours)
  assert not plain.has_generation_blocks
  for messages in CONVERSATIONS:
    ids, mask = _reference(ref, source, messages)
    assert plain.examples(messages) == chat.ChatTemplate(source, 't', ours).examples(messages)
    assert [plain.examples(messages)[0].ids, plain.examples(messages)[0].mask] == [ids, mask]


@pytest.mark.parametrize('kind', ['sp', 'hf'])
def test_not_prefix_stable_template(tokenizers, kind):
  ours, ref = tokenizers[kind]
  plain = _without_generation(REASONING)
  with pytest.raises(chat.ChatFormatError, match=r'chat template reasoning renders the conversation up to '
                     r'message 1 differently once later messages follow .* data.chat_per_turn=True'):
    chat.ChatTemplate(plain, 'reasoning', ours).examples(THINKING)
  # Per turn: each answer in the conversation that ends with it, as the template renders that.
  for source in (REASONING, plain):
    examples = chat.ChatTemplate(source, 'reasoning', ours, per_turn=True).examples(THINKING)
    assert len(examples) == 2
    for example, end in zip(examples, (2, 4)):
      ids, mask = _reference(ref, REASONING, THINKING[:end])
      last = max(i for i, m in enumerate(mask) if not m and i < len(mask) - 1 and mask[i + 1])
      assert example.ids == ids
      assert example.mask == [int(m and i > last) for i, m in enumerate(mask)]
      assert _trained(example)[-1] == THINKING[end - 1]['content'] + '<|im_end|>'
  # With {% generation %} blocks, the whole conversation is one example.
  [example] = chat.ChatTemplate(REASONING, 'reasoning', ours).examples(THINKING)
  assert _trained(example) == ['5<|im_end|>', '<think>2+4=6</think>\n\n6<|im_end|>']


def test_a_token_across_a_span_boundary_is_trained(tokenizers):
  """A token holding characters on both sides of a span's start or end is trained, as transformers
  trains it (the rule in data/chat.py): here " the" starts before the span, " function" ends after it."""
  source = ("{{ 'See t' }}{% generation %}{{ 'he answer: use a fun' }}{% endgeneration %}{{ 'ction.' }}"
            "{% generation %}{{ eos_token }}{% endgeneration %}")
  for kind in ('sp', 'hf'):
    ours, ref = tokenizers[kind]
    [example] = chat.ChatTemplate(source, 'straddle', ours).examples([U('x'), A('y')])
    ids, mask = _reference(ref, source, [U('x'), A('y')])
    assert example.ids == ids and example.mask == mask
    across = [m for (start, end), m in zip(example.offsets, example.mask)
              if start < 5 < end or start < 25 < end]  # the span is characters 5 to 25
    assert across == [1, 1], kind


# --------------------------------------------------------------------------------------------------
# Special-token text in messages

def test_special_token_text_in_a_message_stays_text(tokenizers):
  """A user who types "<|im_end|>" does not end the turn, nor does an answer that quotes "[INST]": the
  one intended difference from transformers' default, the same as its sanitize_control_tokens=True."""
  for kind, name, special in (('hf', 'chatml', '<|im_end|>'), ('hf', 'llama3', '<|eot_id|>'),
                              ('sp', 'mistral-v3', '[INST]')):
    ours, ref = tokenizers[kind]
    template = chat.load_template(name, ours)
    messages = [U(f'say {special} now'), A(f'I will not say {special}.')]
    [example] = template.examples(messages)
    without = [{**m, 'content': m['content'].replace(special, '')} for m in messages]
    written = ref.apply_chat_template(without, chat_template=template.source, return_dict=False)
    assert example.ids.count(ours.token_id(special)) == written.count(ours.token_id(special))
    assert example.ids != ref.apply_chat_template(messages, chat_template=template.source, return_dict=False)
    assert example.ids == ref.apply_chat_template(messages, chat_template=template.source, return_dict=False,
                                                  sanitize_control_tokens=True)
    assert _trained(example)[0].strip().startswith(f'I will not say {special}.')
  # A SentencePiece user-defined piece in a message goes in character by character.
  ours = tokenizers['sp'][0]
  [example] = chat.load_template('chatml', ours).examples([U('<|im_start|>'), A('ok')])
  assert example.ids.count(ours.token_id('<|im_start|>')) == 2
  assert '<|im_start|>user\n<|im_start|><|im_end|>' in example.text


# --------------------------------------------------------------------------------------------------
# Where templates come from

def test_templates_from_the_tokenizer_folder(tokenizers, tmp_path, caplog):
  hf = tokenizers['hf'][0]
  folder = tmp_path / 'tok'
  shutil.copytree(os.path.dirname(hf.path), folder)
  config = json.loads((folder / 'tokenizer_config.json').read_text())
  chatml = chat.load_template('chatml', hf).source
  (folder / 'tokenizer_config.json').write_text(json.dumps({**config, 'chat_template': chatml}))
  tok = load_tokenizer(str(folder))
  with caplog.at_level('INFO'):
    template = chat.load_template('', tok)  # the folder's own template is the default
  assert template.source == chatml and 'tokenizer_config.json' in template.name
  assert 'tokenizer_config.json' in caplog.text  # the log says which template was used
  assert chat.load_template('tokenizer', tok).source == chatml
  # The named-list form: 'default' unless another is named.
  named = [{'name': 'default', 'template': chatml}, {'name': 'tool_use', 'template': '{{ "T" }}'}]
  (folder / 'tokenizer_config.json').write_text(json.dumps({**config, 'chat_template': named}))
  assert chat.load_template('tokenizer', tok).source == chatml
  assert chat.load_template('tokenizer', tok, 'tool_use').render(CHAT) == 'T'
  with pytest.raises(chat.ChatFormatError,
                     match=r"no chat template named 'x' \(it has \['default', 'tool_use'\]\)"):
    chat.load_template('tokenizer', tok, 'x')
  # chat_template.jinja wins over tokenizer_config.json, as in transformers.
  (folder / 'chat_template.jinja').write_text('{{ "FILE" }}')
  assert chat.load_template('tokenizer', tok).render(CHAT) == 'FILE'
  # A .jinja file; without a template anywhere, the default is llama2.
  assert chat.load_template(str(folder / 'chat_template.jinja'), tok).render(CHAT) == 'FILE'
  assert chat.load_template('', tokenizers['sp'][0]).name == chat.FALLBACK == 'llama2'


def test_bad_templates_and_conversations(tokenizers, tmp_path):
  sp = tokenizers['sp'][0]
  # A template that raises: its own message, naming the template.
  with pytest.raises(chat.ChatFormatError,
                     match='chat template llama2 .*user and assistant messages must alternate'):
    chat.load_template('llama2', sp).examples([U('a'), U('b'), A('c')])
  with pytest.raises(chat.ChatFormatError,
                     match=re.escape('(template line 4): roles: ["system", "user", "assistant"]')):
    chat.ChatTemplate(ZEPHYR, 'zephyr', sp).examples([U('a'), {'role': 'bot', 'content': 'x'}])
  with pytest.raises(chat.ChatFormatError,
                     match="unknown chat template 'llama4'; known: llama2, llama3, llama3.1, "
                     'mistral, mistral-v3, chatml, qwen2.5, alpaca, "tokenizer"'):
    chat.load_template('llama4', sp)
  with pytest.raises(chat.ChatFormatError, match='chat template file not found: nope.jinja'):
    chat.load_template('nope.jinja', sp)
  (tmp_path / 'broken.jinja').write_text('{% for m in messages %}\n{{ m.content }')
  with pytest.raises(chat.ChatFormatError, match=r'broken.jinja: line 2: unexpected'):
    chat.load_template(str(tmp_path / 'broken.jinja'), sp)
  (tmp_path / 'set.jinja').write_text(
      '{% set x %}{% generation %}{{ "a" }}{% endgeneration %}{% endset %}b{{ x }}')
  with pytest.raises(chat.ChatFormatError, match='generation %} block inside'):
    chat.load_template(str(tmp_path / 'set.jinja'), sp).examples([U('a'), A('b')])
  with pytest.raises(chat.ChatFormatError, match='renders nothing for assistant message 1'):
    chat.ChatTemplate('{{ messages[0].content }}', 'first', sp).examples([U('a'), A('b')])
  with pytest.raises(chat.ChatFormatError, match='cannot place assistant message 1'):
    chat.ChatTemplate('{{ "P" if add_generation_prompt }}{% for m in messages %}{{ m.content }}{% endfor %}',
                      'x', sp).examples([U('a'), A('b')])
  with pytest.raises(chat.ChatFormatError, match="llama2 .*'bos_token' is undefined"):
    chat.load_template('llama2', tokenizers['qwen'][0]).examples(CHAT)
  # The special tokens a built-in writes must be the tokenizer's.
  with pytest.raises(chat.ChatFormatError,
                     match=r"mistral-v3 needs the special tokens \['\[INST\]', '\[/INST\]'\]"):
    chat.load_template('mistral-v3', tokenizers['hf'][0])
  for messages, error in (([], 'non-empty list'), ([{'role': 'user'}], 'message 0 must be an object'),
                          ([U('a'), A('  ')], 'message 1 is an empty assistant answer')):
    with pytest.raises(chat.ChatFormatError, match=error):
      chat.load_template('llama2', sp).examples(messages)
  # No assistant message: nothing to learn (counted by the SFT pipeline), not an error.
  assert not any(chat.load_template('llama2', sp).examples([U('a')])[0].mask)


# --------------------------------------------------------------------------------------------------
# python -m data.chat

@pytest.mark.e2e
def test_cli_writes_ids_masks_prompts_and_shows_the_trained_text(tokenizers, tmp_path):
  sp = tokenizers['sp'][0]
  data = tmp_path / 'chats.jsonl'
  data.write_text(''.join(json.dumps({'messages': m}) + '\n' for m in CONVERSATIONS[:3]))
  out = tmp_path / 'rendered.jsonl'
  proc = run_cli('data.chat', '--tokenizer', sp.path, '--chat-template', 'llama2', '--input', data,
                 '--output', out, '--show')
  assert proc.returncode == 0, proc.stderr[-3000:]
  template = chat.load_template('llama2', sp)
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  for row, messages in zip(rows, CONVERSATIONS[:3]):
    [example] = template.examples(messages)
    assert (row['ids'], row['mask'], row['prompt_ids']) == (example.ids, example.mask,
                                                             template.prompt_ids(messages[:-1]))
  assert [r['line'] for r in rows] == [1, 2, 3]
  assert '<s>[INST] Name a colour. [/INST]⟦ Blue. </s>⟧' in proc.stdout
  assert '3 examples with chat template llama2; 0 with nothing to train' in proc.stdout
  data.write_text(json.dumps({'messages': CHAT}) + '\n' + json.dumps({'messages': [U('a'), U('b')]}) + '\n')
  proc = run_cli('data.chat', '--tokenizer', sp.path, '--chat-template', 'mistral', '--input', data)
  assert proc.returncode != 0
  assert 'chats.jsonl:2: chat template mistral' in proc.stderr and 'must alternate' in proc.stderr


def test_cli_limit_shows_only_the_first_conversations_and_no_tensorflow_start_up_lines(tokenizers, tmp_path):
  sp = tokenizers['sp'][0]
  data = tmp_path / 'chats.jsonl'
  data.write_text(''.join(json.dumps({'messages': m}) + '\n' for m in CONVERSATIONS[:3]))
  proc = run_cli('data.chat', '--tokenizer', sp.path, '--chat-template', 'llama2', '--input', data,
                 '--show', '--limit', '2')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert [line.split(':')[1] for line in proc.stdout.splitlines() if line.startswith('--- ')] == ['1', '2']
  assert '2 examples with chat template llama2; 0 with nothing to train' in proc.stdout
  # TensorFlow's oneDNN and CPU-instruction notices are quieted by default (README).
  assert 'oneDNN' not in proc.stderr and 'cpu_feature_guard' not in proc.stderr, proc.stderr

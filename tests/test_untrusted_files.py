"""Files from model hubs are untrusted: hostile ones, crafted here, are refused quickly, in bounded
memory, with one clear line naming the file and what is wrong (docs/reliability.md, "Files you did not
make").

Whatever could take unbounded memory or time runs in a child process whose address space is capped
(RLIMIT_AS): the real commands (`python -m data.chat`, `python -m model.convert import`) for a few
cases, one child calling the library for each group of the rest. A check that went missing shows as a
MemoryError, a raw traceback or a timeout instead of the expected message.
"""

import json
import os
import re
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The child processes' address space: enough for JAX and the import of a small model, far below what
# the hostile files would take.
MEMORY_LIMIT = 3 * 2**30
# Each case's own time, and a command's (most of which is starting Python and JAX on a busy machine).
CASE_SECONDS, COMMAND_SECONDS = 10, 60


# Run first in each child, so that the cap holds from its start (a preexec_fn would fork this process,
# which JAX's threads make unsafe).
_CAPPED = f'import resource\nresource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT}, {MEMORY_LIMIT}))\n'
_RUN_MODULE = ('import runpy, sys\nsys.argv = sys.argv[1:]\n'
               "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")


def _start(code: str, *args) -> tuple[subprocess.Popen, float]:
  """A Python child running `code` with `args`, its address space capped."""
  environment = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'}
  process = subprocess.Popen([sys.executable, '-c', _CAPPED + code, *map(str, args)], cwd=ROOT,
                             env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  return process, time.monotonic()


def _finish(started: tuple[subprocess.Popen, float], timeout: float) -> tuple[int, str, str, float]:
  process, start = started
  try:
    out, err = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    out, err = process.communicate()
    return -9, out, err + f'\n(still running after {timeout} s: killed)', time.monotonic() - start
  return process.returncode, out, err, time.monotonic() - start


# --------------------------------------------------------------------------------------------------
# Crafted model folders

TINY = dict(vocab_size=160, embed_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=96,
            max_seq_len=256)


def _model_folder(folder: str, **config_changes) -> str:
  """A 2-layer Llama in Hugging Face's format (config.json, model.safetensors) with random weights;
  `config_changes` edit config.json (None deletes a key)."""
  from model.config import ModelConfig  # pylint: disable=import-outside-toplevel
  from model.weights import hf  # pylint: disable=import-outside-toplevel
  os.makedirs(folder, exist_ok=True)
  cfg = ModelConfig(**TINY)
  rng = np.random.default_rng(0)
  tensors = [(name, shape, np.dtype(np.float32),
              lambda shape=shape: iter([rng.normal(size=shape).astype(np.float32)]))
             for name, shape, _, _ in hf.hf_tensors(None, cfg, np.dtype(np.float32))]
  hf.write_weights(folder, tensors, 2**40, log=None)
  config = {**hf.config_to_hf(cfg, 'llama', 'float32'), **config_changes}
  _write_json(os.path.join(folder, 'config.json'), {k: v for k, v in config.items() if v is not None})
  return folder


def _write_json(path: str, value):
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(value, f)


def _safetensors(path: str, header: dict, data: bytes = b'', header_len: int | None = None):
  """A file in the safetensors layout with this header (written as given, duplicates and all: `header`
  may be a list of (name, entry) pairs) and data."""
  pairs = header.items() if isinstance(header, dict) else header
  blob = ('{' + ','.join(f'{json.dumps(k)}:{json.dumps(v)}' for k, v in pairs) + '}').encode()
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(blob) if header_len is None else header_len) + blob + data)


def _f32(shape, begin):
  n = int(np.prod(shape)) * 4
  return {'dtype': 'F32', 'shape': list(shape), 'data_offsets': [begin, begin + n]}


DEEP_JSON = '{"a": ' * 100_000 + '1' + '}' * 100_000


# --------------------------------------------------------------------------------------------------
# Cases run in a child process: each makes its files, then calls the library, which must raise the
# expected error. `_child` runs a group and prints one result line per case.

def _import(folder: str):
  from model import convert  # pylint: disable=import-outside-toplevel
  convert.import_hf(folder, folder + '-out', log=None)


def _reader(folder: str):
  from model.weights import safetensors  # pylint: disable=import-outside-toplevel
  return safetensors.SafetensorsReader(folder)


def _config_case(changes, expected):
  def case(tmp):
    _import(_model_folder(tmp, **changes))
  return case, expected


def _config_file_case(text, expected):
  def case(tmp):
    _model_folder(tmp)
    with open(os.path.join(tmp, 'config.json'), 'w', encoding='utf-8') as f:
      f.write(text)
    _import(tmp)
  return case, expected


def _index_case(name, expected):
  def case(tmp):
    _model_folder(tmp)
    os.makedirs(os.path.join(tmp, '..', 'other'), exist_ok=True)
    os.replace(os.path.join(tmp, 'model.safetensors'), os.path.join(tmp, '..', 'other', 'x.safetensors'))
    _write_json(os.path.join(tmp, 'model.safetensors.index.json'),
                {'weight_map': {'model.embed_tokens.weight': name.format(tmp=tmp)}})
    _import(tmp)
  return case, expected


def _header_case(header, data, expected, header_len=None, size=None):
  def case(tmp):
    os.makedirs(tmp)
    path = os.path.join(tmp, 'model.safetensors')
    _safetensors(path, header, data, header_len)
    if size:
      os.truncate(path, size)  # sparse: no disk space used
    _reader(tmp)
  return case, expected


def _fifo_weights(tmp):
  _model_folder(tmp)
  os.remove(os.path.join(tmp, 'model.safetensors'))
  os.mkfifo(os.path.join(tmp, 'model.safetensors'))
  _reader(tmp)


def _fifo_config(tmp):
  _model_folder(tmp)
  os.remove(os.path.join(tmp, 'config.json'))
  os.mkfifo(os.path.join(tmp, 'config.json'))
  _import(tmp)


ADAPTER = {'peft_type': 'LORA', 'r': 4, 'lora_alpha': 8, 'target_modules': ['q_proj']}


def _adapter_case(config_changes, tensors, expected):
  """An adapter folder for the TINY base: adapter_config.json with `config_changes`, and
  adapter_model.safetensors with the header `tensors` (and no data beyond 64 bytes)."""
  def case(tmp):
    from model.config import ModelConfig  # pylint: disable=import-outside-toplevel
    from model.weights import peft  # pylint: disable=import-outside-toplevel
    os.makedirs(tmp)
    _write_json(os.path.join(tmp, peft.CONFIG), {**ADAPTER, **config_changes})
    _safetensors(os.path.join(tmp, peft.WEIGHTS), tensors, bytes(64))
    peft.read(tmp, ModelConfig(**TINY), 'TINY')
  return case, expected


_A = 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'
_B = 'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight'
_SMALL_ADAPTER = {_A: _f32((4, 64), 0), _B: {**_f32((64, 4), 0), 'data_offsets': [0, 0]}}

FOLDER_CASES = {
    # config.json's sizes, before they drive any allocation.
    'config_with_a_million_layers': _config_case(
        {'num_hidden_layers': 10**6}, r'config\.json says num_hidden_layers=1000000, but the safetensors '
        r'of .* hold 2 \(layers 0-1\)'),
    'config_with_a_billion_wide_stream': _config_case(
        {'hidden_size': 10**9}, r'model\.safetensors: model\.embed_tokens\.weight has shape \(160, 64\), '
        r"but the folder's config\.json implies \(160, 1000000000\)"),
    # The sharded index names files outside the folder.
    'index_with_a_parent_path': _index_case('../other/x.safetensors', r'model\.safetensors\.index\.json: '
                                            r"names the file '\.\./other/x\.safetensors', outside the model "
                                            'folder'),
    'index_with_an_absolute_path': _index_case('{tmp}/../other/x.safetensors', 'an absolute path'),
    # Headers the safetensors library refuses.
    'header_with_a_negative_offset': _header_case(
        {'w': {'dtype': 'F32', 'shape': [2], 'data_offsets': [-8, 0]}}, bytes(8),
        r"tensor 'w' has data_offsets \[-8, 0\]"),
    'header_with_overlapping_ranges': _header_case(
        {'a': _f32([2], 0), 'b': _f32([2], 4)}, bytes(12),
        r"tensor 'b' starts at byte 4 .*\(overlapping ranges\)"),
    'header_naming_a_tensor_twice': _header_case(
        [('w', _f32([2], 0)), ('w', _f32([2], 8))], bytes(16), r"the header names 'w' twice"),
    'header_leaving_bytes_uncovered': _header_case(
        {'w': _f32([2], 0)}, bytes(8 + 1000), r'bytes no tensor covers'),
    'header_whose_shape_and_range_differ': _header_case(
        {'w': {'dtype': 'F32', 'shape': [1000], 'data_offsets': [0, 8]}}, bytes(8),
        r"tensor 'w' has 8 bytes \(data_offsets \[0, 8\]\), but its shape \(1000,\) and dtype F32 "
        r'need 4,000'),
    'header_of_150_MB': _header_case({}, b'', 'its header claims 150,000,000 bytes, more than the '
                                     '100,000,000 allowed', header_len=150_000_000, size=150_000_100),
    'header_of_an_unknown_dtype': _header_case({'w': {'dtype': 'F8_E4M3', 'shape': [8],
                                                      'data_offsets': [0, 8]}}, bytes(8),
                                               "tensor 'w' has unsupported dtype 'F8_E4M3'"),
    # A FIFO blocks whoever opens it for reading until a writer comes.
    'weights_that_are_a_fifo': (_fifo_weights, r'model\.safetensors is a FIFO, not a regular file'),
    'config_that_is_a_fifo': (_fifo_config, r'config\.json is a FIFO, not a regular file'),
    # A PEFT adapter tensor claiming 2 TiB (its range consistent with its shape, the file short).
    'adapter_tensor_of_2_TiB': _adapter_case(
        {}, {_A: _f32((2**19, 2**20), 0)}, r'adapter_model\.safetensors: its tensors end at byte '
        r'2,199,023,255,552 of the data, but the file holds 64 bytes of data after the header \(truncated\)'),
    # Values of the wrong type, or missing, name the file and the key.
    'config_without_num_attention_heads': _config_case(
        {'num_attention_heads': None}, r'config\.json: num_attention_heads is missing \(expected a positive '
        r'integer\)'),
    'config_with_heads_as_a_string': _config_case(
        {'num_attention_heads': '4'}, r"config\.json: num_attention_heads must be a positive integer, got "
        r"'4' \(a str\)"),
    'config_with_rope_scaling_a_string': _config_case(
        {'rope_scaling': 'llama3'}, r"config\.json: rope_scaling must be a JSON object, got 'llama3'"),
    'config_with_eps_a_string': _config_case(
        {'rms_norm_eps': 'tiny'}, r"config\.json: rms_norm_eps must be a positive number, got 'tiny'"),
    'config_with_architectures_an_object': _config_case(
        {'architectures': {'LlamaForCausalLM': 1}}, r'config\.json: architectures must be a list of strings'),
    'config_with_llama3_rope_lacking_factor': _config_case(
        {'rope_scaling': {'rope_type': 'llama3'}}, r'config\.json: rope_scaling\.factor is missing'),
    'config_nested_100000_deep': _config_file_case(DEEP_JSON,
                                                   r'config\.json: JSON nested too deeply to parse'),
    'config_that_is_a_list': _config_file_case('[1, 2]', r'config\.json: the file must be a JSON object'),
    'config_with_a_5000_digit_number': _config_file_case('{"vocab_size": ' + '9' * 5000 + '}',
                                                         r'config\.json: malformed JSON \(Exceeds the limit'),
    'adapter_config_with_rank_a_string': _adapter_case(
        {'r': '4'}, _SMALL_ADAPTER, r"adapter_config\.json: r must be a positive integer, got '4'"),
    'adapter_config_without_rank': _adapter_case(
        {'r': None}, _SMALL_ADAPTER, r'adapter_config\.json: r is missing'),
    'adapter_config_with_alpha_a_list': _adapter_case(
        {'lora_alpha': [8]}, _SMALL_ADAPTER, r'adapter_config\.json: lora_alpha must be a positive number'),
    'adapter_config_with_a_dropout_of_2': _adapter_case(
        {'lora_dropout': 2}, _SMALL_ADAPTER,
        r'adapter_config\.json: Invalid LoRA config:\s+lora\.dropout must be in \[0, 1\)'),
}

# Chat templates: (source, what the error says). The tokenizer does not matter to rendering.
TEMPLATES = {
    # The audit's: 70 bytes that took 11.7 GB and 36 s.
    'a_string_times_ten_billion': ("{{ 'a' * 10**10 }}", r"'\*' of a str of 1 by 10,000,000,000 would take "
                                   r'its rendering past [\d,]+ bytes'),
    'a_huge_power': ('{{ 10 ** 10000000000 }}', r"'\*\*' of a 4-bit integer by 10,000,000,000 would make an "
                    r'integer of more than 65,536 bits'),
    'integers_squared_in_a_loop': ('{% set ns = namespace(n=10 ** 100) %}{% for i in range(64) %}'
                                   '{% set ns.n = ns.n * ns.n %}{% endfor %}', r'an integer of more than'),
    'a_float_overflowing': ('{{ 2.0 ** 100000 }}', r'Numerical result out of range'),
    'nested_loops': ('{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}',
                     r'more than [\d,]+ loop iterations, calls and operations'),
    'exponentially_many_macro_calls': ('{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}'
                                       '{% endif %}{% endmacro %}{{ f(60) }}', r'loop iterations, calls'),
    'a_macro_calling_itself': ('{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}',
                               r'maximum recursion depth exceeded'),
    'long_output': ("{% set s = 'x' * 1000 %}{% for i in range(10000) %}{{ s }}{% endfor %}",
                    r'renders more than [\d,]+ characters'),
    'a_string_doubled_with_tilde': ("{% set ns = namespace(s='x') %}{% for i in range(64) %}"
                                    '{% set ns.s = ns.s ~ ns.s %}{% endfor %}', r"'~' would take"),
    'a_string_doubled_with_plus': ("{% set ns = namespace(s='x') %}{% for i in range(64) %}"
                                   '{% set ns.s = ns.s + ns.s %}{% endfor %}', r"'\+' would take"),
    'a_string_doubled_in_a_set_block': ("{% set ns = namespace(s='x') %}{% for i in range(64) %}"
                                        '{% set t %}{{ ns.s }}{{ ns.s }}{% endset %}{% set ns.s = t %}'
                                        '{% endfor %}', r'its output would take'),
    'a_string_doubled_by_a_macro': ("{% macro d(s) %}{{ s }}{{ s }}{% endmacro %}"
                                    "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
                                    '{% set ns.s = d(ns.s) %}{% endfor %}', r"macro 'd' would take"),
    'a_list_holding_itself_twice_written': ("{% set ns = namespace(a=[1]) %}{% for i in range(64) %}"
                                            '{% set ns.a = [ns.a, ns.a] %}{% endfor %}{{ ns.a }}',
                                            r'holds the same parts many times over'),
    'a_list_holding_itself_twice_compared': ("{% set ns = namespace(a=[1], b=[1]) %}{% for i in range(64) %}"
                                             '{% set ns.a = [ns.a, ns.a] %}{% set ns.b = [ns.b, ns.b] %}'
                                             '{% endfor %}{{ ns.a == ns.b }}', r'a comparison would take'),
    'a_tuple_holding_itself_twice_hashed': ("{% set ns = namespace(a=(1,)) %}{% for i in range(64) %}"
                                            '{% set ns.a = (ns.a, ns.a) %}{% endfor %}{{ {ns.a: 1} }}',
                                            r'a comparison would take'),
    'padding_by_a_filter': ("{{ 'x'|center(10**10) }}", r"filter 'center' would take"),
    'padding_by_a_method': ("{{ 'x'.ljust(10**10) }}", r"'ljust\(\)' would take"),
    'replacing_every_position': ("{{ ('x' * 100000)|replace('', 'y' * 100000) }}",
                                 r"filter 'replace' would take"),
    'a_format_width': ("{{ '{:>10000000000}'.format('x') }}", r"'format\(\)' would take"),
    'a_percent_width': ("{{ '%*d' % (10**10, 1) }}", r"'%' would take"),
    'a_long_separator': ("{{ range(100000)|join('y' * 100000) }}", r"filter 'join' would take"),
    'a_batch_filled_to_ten_billion': ("{{ range(10)|batch(10**10, 'x')|list }}",
                                      r"filter 'batch' would take"),
    'lorem_ipsum': ('{{ lipsum(100000, min=100000, max=100000) }}', r"'generate_lorem_ipsum\(\)' would take"),
    'json_indented_a_billion': ('{{ [[[[1]]]]|tojson(indent=10**9) }}', r"filter 'tojson' would take"),
    'a_sum_of_lists': ('{{ ([[1]] * 100000)|sum(start=[]) }}', r'adds numbers only'),
    'source_nested_100000_deep': ('{{ ' + '(' * 100_000 + '1' + ')' * 100_000 + ' }}', r'cannot be compiled'),
    'source_of_a_million_characters': ('x' * (2**20 + 1), r'1,048,577 characters long; a template may have '
                                       'at most 1,048,576'),
}


class _NoTokens:
  """What a ChatTemplate asks of its tokenizer before any tokenizing."""
  special_tokens_map: dict = {}
  path = ''

  def special_tokens(self):
    return {}


def _render(name):
  from data import chat  # pylint: disable=import-outside-toplevel
  source = TEMPLATES[name][0]

  def case(tmp):  # pylint: disable=unused-argument
    try:
      chat.ChatTemplate(source, name, _NoTokens()).render(
          [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}])
    except chat.ChatFormatError as e:
      raise ValueError(str(e)) from None
  return case


def _child(group: str, folder: str):
  """Runs each case of `group` in turn (this process's memory capped by the parent), printing one
  `RESULT {name, error, message, seconds}` line per case."""
  from data import chat  # pylint: disable=import-outside-toplevel,unused-import  (not timed: imports)
  from model import convert  # pylint: disable=import-outside-toplevel,unused-import
  names = sorted(FOLDER_CASES) if group == 'folders' else sorted(TEMPLATES)
  for name in names:
    case = FOLDER_CASES[name][0] if group == 'folders' else _render(name)
    start = time.monotonic()
    try:
      case(os.path.join(folder, name, 'model'))
      error, message = None, ''
    except BaseException as e:  # pylint: disable=broad-exception-caught  (MemoryError included)
      error, message = type(e).__name__, str(e)
    print('RESULT ' + json.dumps({'name': name, 'error': error, 'message': message[:2000],
                                  'seconds': time.monotonic() - start}), flush=True)


@pytest.fixture(scope='module')
def children(tmp_path_factory):
  """Both groups, each in its own memory-capped child process, started together."""
  started = {group: _start('import sys\nfrom tests import test_untrusted_files as t\n'
                           't._child(sys.argv[1], sys.argv[2])\n', group, tmp_path_factory.mktemp(group))
             for group in ('folders', 'templates')}
  results = {}
  for group, process in started.items():
    code, out, err, _ = _finish(process, timeout=300)
    for line in out.splitlines():
      if line.startswith('RESULT '):
        result = json.loads(line[len('RESULT '):])
        results[result['name']] = result
    results[f'({group})'] = f'exit status {code}; stderr: {err[-3000:]}'
  return results


def _check(children, name, group, expected):
  result = children.get(name)
  assert result is not None, f'{name} never finished: {children[f"({group})"]}'
  assert result['error'] == 'ValueError', result
  assert re.search(expected, result['message']), result
  assert result['seconds'] < CASE_SECONDS, result


@pytest.mark.parametrize('name', sorted(FOLDER_CASES))
def test_hostile_model_folders_are_refused(children, name):
  _check(children, name, 'folders', FOLDER_CASES[name][1])
  if name.startswith(('config', 'index')):
    assert 'config.json' in children[name]['message'] or 'index.json' in children[name]['message']


@pytest.mark.parametrize('name', sorted(TEMPLATES))
def test_hostile_chat_templates_are_refused(children, name):
  _check(children, name, 'templates', rf'^chat template {name}\b.*' + TEMPLATES[name][1])


# --------------------------------------------------------------------------------------------------
# The real commands: one `error:` line naming the file and what is wrong, within seconds.

@pytest.fixture(scope='module')
def commands(tmp_path_factory):
  """Each command's (status, stderr, seconds), all started together."""
  root = tmp_path_factory.mktemp('commands')
  from tests.tokenizers_for_tests import make_hf_tokenizer  # pylint: disable=import-outside-toplevel
  tokenizer = make_hf_tokenizer(root / 'tokenizer')
  config_path = root / 'tokenizer' / 'tokenizer_config.json'
  config = json.loads(config_path.read_text())
  # The default template of `data.chat`: the one inside the tokenizer folder's tokenizer_config.json.
  config_path.write_text(json.dumps({**config, 'chat_template': "{{ 'a' * 10**10 }}"}))
  chats = root / 'chats.jsonl'
  chats.write_text(json.dumps({'messages': [{'role': 'user', 'content': 'Hi'}]}) + '\n')
  deep = root / 'deep.jsonl'
  deep.write_text(json.dumps({'messages': [{'role': 'user', 'content': 'Hi'}]}) + '\n' + DEEP_JSON + '\n')
  layers = _model_folder(str(root / 'layers'), num_hidden_layers=10**6)
  fifo = _model_folder(str(root / 'fifo'))
  os.remove(os.path.join(fifo, 'model.safetensors'))
  os.mkfifo(os.path.join(fifo, 'model.safetensors'))
  heads = _model_folder(str(root / 'heads'), num_attention_heads=None)
  runs = {
      'template': (['data.chat', '--tokenizer', tokenizer, '--input', chats],
                   rf"{re.escape(str(config_path))} \(template line 1\): '\*' of a str of 1 by "
                   '10,000,000,000'),
      'deep_record': (['data.chat', '--tokenizer', tokenizer, '--chat-template', 'chatml',
                       '--input', deep], rf'{re.escape(str(deep))}:2: JSON nested too deeply to parse'),
      'layers': (['model.convert', 'import', '--hf-dir', layers, '--out', root / 'out-layers'],
                 rf'{re.escape(layers)}/config\.json says num_hidden_layers=1000000, but the safetensors '
                 rf'of {re.escape(layers)} hold 2'),
      'fifo': (['model.convert', 'import', '--hf-dir', fifo, '--out', root / 'out-fifo'],
               rf'{re.escape(fifo)}/model\.safetensors is a FIFO, not a regular file'),
      'heads': (['model.convert', 'import', '--hf-dir', heads, '--out', root / 'out-heads'],
                rf'{re.escape(heads)}/config\.json: num_attention_heads is missing \(expected a positive '
                'integer\\)'),
  }
  started = {name: _start(_RUN_MODULE, *args) for name, (args, _) in runs.items()}
  return {name: (*_finish(started[name], timeout=COMMAND_SECONDS * 2), runs[name][1]) for name in runs}


@pytest.mark.parametrize('name', ['template', 'deep_record', 'layers', 'fifo', 'heads'])
def test_commands_refuse_hostile_files_in_one_line(commands, name):
  code, _, err, seconds, expected = commands[name]
  errors = [line for line in err.splitlines() if line.startswith('error:')]
  assert code == 1 and len(errors) == 1, err[-3000:]
  assert re.search(expected, errors[0]), errors[0]
  assert 'Traceback' not in err, err[-3000:]
  assert seconds < COMMAND_SECONDS, (seconds, err[-3000:])


# --------------------------------------------------------------------------------------------------
# In this process: what cannot take much memory or time, and what must keep working.

def test_deep_json_records_are_bad_records_that_skip_bad_records_skips(tmp_path):
  from data import records, sft  # pylint: disable=import-outside-toplevel
  from data.config import get_config  # pylint: disable=import-outside-toplevel
  with pytest.raises(records.BadRecord, match='x.jsonl:7: JSON nested too deeply to parse'):
    records.parse_json(DEEP_JSON, 'x.jsonl:7')
  with pytest.raises(records.BadRecord, match=r'x.jsonl:8: malformed JSON \(Exceeds the limit'):
    records.parse_json('{"n": ' + '9' * 5000 + '}', 'x.jsonl:8')
  path = tmp_path / 'chats.jsonl'
  good = json.dumps({'messages': [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Yo'}]})
  path.write_text(f'{good}\n{DEEP_JSON}\n{good}\n')
  cfg = get_config()
  cfg.update(dict(format='chat', skip_bad_records=True))
  counts = records.Counters()
  kept = list(sft.parsed_records(str(path), cfg, counts, 'train', lambda record: record))
  assert [where for where, _ in kept] == [f'{path}:1', f'{path}:3']
  assert counts.snapshot() == {'train_skipped_bad_records': 1}


def test_a_deep_tokenizer_config_names_the_file(tmp_path):
  from data import chat  # pylint: disable=import-outside-toplevel
  from data.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
  from tests.tokenizers_for_tests import make_hf_tokenizer  # pylint: disable=import-outside-toplevel
  folder = make_hf_tokenizer(tmp_path)
  (tmp_path / 'tokenizer_config.json').write_text(DEEP_JSON)
  with pytest.raises(ValueError, match='tokenizer_config.json: JSON nested too deeply to parse'):
    load_tokenizer(folder)
  with pytest.raises(ValueError, match='tokenizer_config.json: JSON nested too deeply to parse'):
    chat.tokenizer_templates(folder)
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'chat_template': [{'name': 1}]}))
  with pytest.raises(chat.ChatFormatError, match=r'tokenizer_config.json: chat_template must be a string '
                     'or a list'):
    chat.tokenizer_templates(folder)
  os.mkfifo(tmp_path / 'chat_template.jinja')
  with pytest.raises(chat.ChatFormatError, match='chat_template.jinja is not a regular file'):
    chat.tokenizer_templates(folder)
  os.remove(tmp_path / 'tokenizer_config.json')
  os.mkfifo(tmp_path / 'tokenizer_config.json')
  with pytest.raises(ValueError, match='tokenizer_config.json is not a regular file'):
    load_tokenizer(folder)


def test_links_inside_a_model_folder_are_read_as_the_hub_cache_makes_them(tmp_path):
  # The Hugging Face cache: snapshots/<rev>/model.safetensors -> ../../blobs/<hash>; a sharded index
  # naming a shard in a subfolder is inside the folder too.
  from model.weights import hf  # pylint: disable=import-outside-toplevel
  source = _model_folder(str(tmp_path / 'source'))
  snapshot = tmp_path / 'cache' / 'snapshots' / 'abc'
  (tmp_path / 'cache' / 'blobs').mkdir(parents=True)
  snapshot.mkdir(parents=True)
  for name in ('config.json', 'model.safetensors'):
    os.replace(os.path.join(source, name), tmp_path / 'cache' / 'blobs' / name)
    os.symlink(f'../../blobs/{name}', snapshot / name)
  cfg, _, _ = hf.read_config(str(snapshot), param_dtype='float32')
  assert (cfg.n_layers, cfg.embed_dim, cfg.vocab_size) == (2, 64, 160)
  linked = hf.load_hf_params(str(snapshot), cfg, np.dtype(np.float32), log=None)
  (snapshot / 'shards').mkdir()
  os.symlink('../../../blobs/model.safetensors', snapshot / 'shards' / 'part.safetensors')
  os.remove(snapshot / 'model.safetensors')
  _write_json(str(snapshot / 'model.safetensors.index.json'),
              {'weight_map': {'model.embed_tokens.weight': 'shards/part.safetensors'}})
  sharded = hf.load_hf_params(str(snapshot), cfg, np.dtype(np.float32), log=None)
  assert all(np.array_equal(a, b) for a, b in zip(_leaves(linked), _leaves(sharded)))


def _leaves(tree):
  return [x for value in tree.values() for x in (_leaves(value) if isinstance(value, dict) else [value])]

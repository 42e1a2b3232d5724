"""Failures end within seconds, as one line for a person, and never corrupt a workdir. Each case runs
the real commands as separate processes, as the fault battery (test_faults.py) does: a bad record 20
times in a row (it used to hang at exit), two runs on one workdir, checkpoints with a flipped byte, a
truncated or a deleted file, a disk that fills up, the rerun of a finished run, a missing coordinator,
and bad command-line arguments. Independent processes run side by side.
"""

import concurrent.futures
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from data import config as data_config
from data import instructions, records, sources
from data.iterator import DatasetIterator
from model.weights import checksums
from model.weights import params as params_lib
from tests.builders import micro_flags
from tests.cli import run_cli
from train import workdir as workdir_lib

pytestmark = pytest.mark.e2e

SMALL = ['--config=configs/tiny.py', *micro_flags(), '--config.train.batch_size=8',
         '--config.train.seq_len=64', '--config.train.log_every=1', '--config.train.eval_every=0',
         '--config.train.eval_max_batches=1', '--config.train.eval_at_start=False',
         '--config.checkpoint.every_steps=4', '--config.optimizer.warmup_steps=2']
BOUND_S = 120  # far beyond what any of these takes, even on a busy 2-core machine; a hang is forever


class Result:

  def __init__(self, args, rc, out, seconds, ended):
    self.args, self.rc, self.out, self.seconds, self.ended = args, rc, out, seconds, ended

  def __repr__(self):
    return f'rc {self.rc} after {self.seconds:.1f} s: {" ".join(self.args)}\n{self.out[-3000:]}'

  def error_lines(self):
    return [line for line in self.out.splitlines() if line.startswith('error: ')]


def _run(module, *args, devices=2, timeout=BOUND_S, **env) -> Result:
  """Runs `python -m module args` to its end (stdout and stderr together), with TensorFlow's log level
  as a user has it (the commands quieten TensorFlow themselves)."""
  start = time.monotonic()
  proc = run_cli(module, *args, timeout=timeout, devices=devices, merge_output=True,
                 TF_CPP_MIN_LOG_LEVEL=None, **env)
  return Result(proc.args[2:], proc.returncode, proc.stdout, time.monotonic() - start, time.time())


def _run_compiling(module, *args) -> Result:
  """_run without the session's compilation cache: a run that compiles all it runs, as a first run
  does, for the tests that race other commands against the time it takes."""
  return _run(module, *args, JAX_COMPILATION_CACHE_DIR='')


def _run_all(commands, parallel: int = 3) -> list[Result]:
  """Runs (module, *args) commands, `parallel` at a time."""
  with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
    return list(pool.map(lambda command: _run(*command), commands))


def _pretrain_args(demo_data, workdir, steps=8, train_files=None, *extra):
  return ('train.pretrain', f'--workdir={workdir}', *SMALL, f'--config.train.steps={steps}',
          f'--config.data.train_files={train_files or demo_data["train"]}',
          f'--config.data.eval_files={demo_data["eval"]}',
          f'--config.data.tokenizer={demo_data["tokenizer"]}', *extra)


def _failed(result: Result, *fragments):
  """Exit status 1, one `error:` line holding every fragment, and no traceback on the console."""
  assert result.rc == 1, result
  lines = result.error_lines()
  assert len(lines) == 1, result
  for fragment in fragments:
    assert fragment in lines[0], (fragment, result)
  assert 'Traceback' not in result.out, result


@pytest.fixture(scope='module')
def trained(demo_data, tmp_path_factory):
  """A finished 8-step pretraining run (checkpoints of steps 4 and 8), trained on documents that
  hold U+2028 and U+2029 inside their JSON strings: they are part of the line."""
  root = tmp_path_factory.mktemp('trained')
  train = root / 'train.jsonl'
  with open(demo_data['train'], encoding='utf-8') as f:
    lines = f.readlines()[:200]
  separators = [json.dumps({'text': f'line one\u2028line two\u2029para {i}'}, ensure_ascii=False) + '\n'
                for i in range(20)]
  train.write_text(''.join(separators + lines), encoding='utf-8')
  workdir = root / 'run'
  result = _run(*_pretrain_args(demo_data, workdir, 8, train))
  assert result.rc == 0, result
  assert params_lib.saved_steps(workdir / 'checkpoints') == [4, 8]
  return {'workdir': workdir, 'train': train, 'log': result.out}


def _copy(trained, tmp_path, name='run'):
  shutil.copytree(trained['workdir'], tmp_path / name)
  return tmp_path / name


def _chat_file(tmp_path):
  path = tmp_path / 'chat.jsonl'
  path.write_text(''.join(json.dumps({'messages': [
      {'role': 'user', 'content': f'question {i}?'}, {'role': 'assistant', 'content': 'answer.'}]}) + '\n'
                          for i in range(64)))
  return path


def _sft_args(demo_data, workdir, init_from, sft_files, steps=4, *extra):
  return ('train.sft', f'--workdir={workdir}', '--config=configs/sft_tiny.py', *SMALL[1:],
          f'--config.init_from={init_from}', f'--config.data.train_files={sft_files}',
          '--config.data.eval_files=', f'--config.data.tokenizer={demo_data["tokenizer"]}',
          f'--config.train.steps={steps}', *extra)


# --------------------------------------------------------------------------------------------------
# Exiting

@pytest.mark.slow
def test_a_bad_record_fails_within_seconds_twenty_times_in_a_row(demo_data, tmp_path):
  """A JSON list where a document should be: one line naming the file and line, status 1, and the
  process gone right after, every time (tf.data's worker threads used to hold 8 of 15 runs at exit)."""
  with open(demo_data['train'], encoding='utf-8') as f:
    lines = f.readlines()[:40]
  bad = tmp_path / 'list_line.jsonl'
  bad.write_text(''.join(lines[:2] + ['["a", "b"]\n'] + lines[2:]), encoding='utf-8')
  results = _run_all([_pretrain_args(demo_data, tmp_path / f'run{i}', 8, bad) for i in range(20)])
  for i, result in enumerate(results):
    _failed(result, f"{bad}:3: JSON record has no 'text' field", 'skip_bad_records=True')
    workdir = tmp_path / f'run{i}'
    # The failure is told and written down, then the process ends at once.
    [traceback_file] = glob.glob(str(workdir / 'errors' / '*.txt'))
    assert 'BadRecord' in open(traceback_file, encoding='utf-8').read()
    assert result.ended - os.path.getmtime(traceback_file) < 15, result
    # Nothing of the run was written before its data was known to be good.
    assert sorted(os.listdir(workdir)) == ['errors'], result
  print('seconds per run:', sorted(round(r.seconds, 1) for r in results))


def test_a_missing_coordinator_is_an_error_naming_it():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  result = _run('train.benchmark', '--config=configs/tiny.py', '--steps=0',
                f'--config.distributed.coordinator_address=127.0.0.1:{port}',
                '--config.distributed.num_processes=2', '--config.distributed.process_id=1',
                '--config.distributed.initialization_timeout_s=2')
  _failed(result, f'process 1 of 2 found no coordinator at 127.0.0.1:{port} within 2 s',
          'config.distributed.coordinator_address')


# --------------------------------------------------------------------------------------------------
# One run per workdir

@pytest.mark.slow
def test_two_runs_on_one_workdir(demo_data, tmp_path):
  """Started at once, one runs and the other refuses at once, naming it; a third, started while the
  first compiles, refuses too. The first run's steps are logged once and its checkpoints are intact."""
  workdir = tmp_path / 'run'
  args = _pretrain_args(demo_data, workdir, 8)
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    pair = [pool.submit(_run_compiling, *args) for _ in range(2)]
    log = workdir / 'errors'
    while not log.exists():  # the loser has reported; the winner loads data and compiles
      assert not all(p.done() for p in pair)
      time.sleep(0.1)
    third = pool.submit(_run_compiling, *args).result()
    first, second = sorted((p.result() for p in pair), key=lambda r: r.rc)
  assert first.rc == 0, first
  assert 'First step (with compilation) done' in first.out
  for refused in (second, third):
    _failed(refused, f'{workdir} is in use by another run: train.pretrain, pid', 'take_over_lock=True')
    assert refused.seconds < first.seconds
  assert third.ended < first.ended  # refused while the first was still at work
  with open(workdir / 'metrics.jsonl', encoding='utf-8') as f:
    assert [r['step'] for r in map(json.loads, f) if 'loss' in r] == list(range(1, 9))
  assert [checksums.check(workdir / 'checkpoints' / s).status for s in ('4', '8')] == ['ok', 'ok']
  assert not (workdir / workdir_lib.LOCK).exists()


@pytest.mark.slow
def test_a_finished_run_rerun_keeps_its_results_and_stale_locks_are_taken_over(demo_data, trained,
                                                                                 tmp_path):
  workdir = _copy(trained, tmp_path)
  kept = {name: (workdir / name).read_bytes()
          for name in ('final_metrics.json', 'metrics.jsonl', 'eval_results.json', 'config.json')}
  assert len(json.loads(kept['final_metrics.json'])) > 5  # the full record, not {"step": 8}
  # A lock left by a process that is gone (SIGKILLed) on this host.
  dead = subprocess.Popen(['sleep', '60'])
  dead.send_signal(signal.SIGKILL)
  dead.wait()
  (workdir / workdir_lib.LOCK).write_text(json.dumps(
      {'host': socket.gethostname(), 'pid': dead.pid, 'program': 'train.pretrain', 'started': 'then'}))
  rerun = _run(*_pretrain_args(demo_data, workdir, 8, trained['train']))
  assert rerun.rc == 0, rerun
  assert f'Taking over the lock of {workdir}: train.pretrain, pid {dead.pid}' in rerun.out
  assert 'finished at step 8 already' in rerun.out
  assert {name: (workdir / name).read_bytes() for name in kept} == kept
  assert not (workdir / workdir_lib.LOCK).exists()
  # A live holder (this process) is refused, unless told to take over (one after the other: a run
  # that took the lock over removes it when it ends).
  with workdir_lib.RunLock(str(workdir)):
    refused = _run(*_pretrain_args(demo_data, workdir, 8, trained['train']))
    forced = _run(*_pretrain_args(demo_data, workdir, 8, trained['train'],
                                  '--config.train.take_over_lock=True'))
  _failed(refused, f'is in use by another run: {workdir_lib._program()}, pid {os.getpid()} on host')  # pylint: disable=protected-access
  assert forced.rc == 0 and 'Taking over the lock' in forced.out, forced


# --------------------------------------------------------------------------------------------------
# Checksummed checkpoints

def _chunk(step_dir, key: str):
  """(file, offset, length) of the stored chunk of array `key` (e.g. 'params.token_embed') in the
  step's OCDBT database, read from its B-tree by TensorStore."""
  import tensorstore as ts  # pylint: disable=import-outside-toplevel
  state = os.path.join(step_dir, 'state')
  kv = ts.KvStore.open(f'file://{state}/').result()
  version = ts.ocdbt.dump(kv).result()['versions'][-1]
  assert version['root_height'] == 0  # one leaf node holds every key of a model this small
  for entry in ts.ocdbt.dump(kv, version['root']['location']).result()['entries']:
    if entry['key'].startswith(f'{key}/0'.encode()) and 'indirect_value' in entry:
      _, prefix, name, offset, length = entry['indirect_value'].split(':')
      return os.path.join(state, prefix, name), int(offset), int(length)
  raise KeyError(key)


def _flip_byte(path, offset):
  with open(path, 'r+b') as f:
    f.seek(offset)
    byte = f.read(1)
    f.seek(offset)
    f.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.slow
def test_damaged_checkpoints_are_refused_naming_step_and_file(demo_data, trained, tmp_path):
  """One flipped byte in the parameters, or in the optimizer state; a truncated file; a deleted one:
  resuming, init_from, generation, export, generate-metrics and the verify command all refuse the step,
  naming it, the file, and the newest earlier step that is intact."""
  runs = {}
  for case in ('params', 'opt_state', 'truncated', 'deleted'):
    runs[case] = _copy(trained, tmp_path, case)
  step8 = lambda case: runs[case] / 'checkpoints' / '8'
  flipped = {}  # case -> the file holding the flipped byte
  for case, key in (('params', 'params.token_embed'), ('opt_state', 'opt_state.1.0.mu.token_embed')):
    path, offset, length = _chunk(step8(case), key)
    _flip_byte(path, offset + length // 2)
    flipped[case] = os.path.relpath(path, step8(case))
  damaged_file = flipped['params']
  with open(step8('truncated') / damaged_file, 'r+b') as f:
    f.truncate(1000)
  os.remove(step8('deleted') / 'model_config' / 'metadata')

  # Orbax alone restores the flipped parameter silently, with other values: the checksums matter.
  cfg = params_lib.load_model_config(trained['workdir'])
  good = jax.device_get(params_lib.load_params(trained['workdir'], params_lib.abstract_params_on(cfg)))
  unchecked = _copy(trained, tmp_path, 'unchecked')
  shutil.copy(step8('params') / damaged_file, unchecked / 'checkpoints' / '8' / damaged_file)
  os.remove(unchecked / 'checkpoints' / '8' / checksums.MANIFEST)
  silent = jax.device_get(params_lib.load_params(unchecked, params_lib.abstract_params_on(cfg)))
  assert not np.array_equal(silent['token_embed'], good['token_embed'])

  sft_files = _chat_file(tmp_path)
  resume = lambda case, *extra: _pretrain_args(demo_data, runs[case], 12, trained['train'], *extra)
  generate = lambda ckpt: ('model.generate', '--ckpt', ckpt, '--tokenizer', demo_data['tokenizer'],
                           '--prompt', 'The for statement', '--max-new-tokens', '4')
  commands = {
      'resume params': resume('params'),
      'resume opt_state': resume('opt_state'),
      'resume truncated': resume('truncated'),
      'init_from': _sft_args(demo_data, tmp_path / 'sft', runs['params'], sft_files),
      'generate opt_state': generate(runs['opt_state']),
      'export': ('model.convert', 'export', '--ckpt', runs['params'], '--out', tmp_path / 'hf'),
      'generate-metrics': ('model.evaluate', 'generate-metrics', '--ckpt', runs['opt_state'],
                           '--tokenizer', demo_data['tokenizer'], '--data', sft_files,
                           '--chat-template', 'llama2'),
      'generate deleted': generate(runs['deleted']),
      'generate step 4': generate(runs['deleted'] / 'checkpoints' / '4'),
      'verify': ('train.checkpoint', 'verify', runs['truncated'], trained['workdir']),
  }
  results = dict(zip(commands, _run_all(commands.values())))
  mismatch = lambda case: f'{flipped[case]}: bytes 0-'
  for case in ('params', 'opt_state'):
    _failed(results[f'resume {case}'],
            f'checkpoint step 8 in {runs[case]}/checkpoints is damaged: {mismatch(case)}',
            f'newest earlier step that looks intact is {runs[case]}/checkpoints/4',
            '--config.checkpoint.fall_back_to_intact=True')
  _failed(results['resume truncated'], f'{damaged_file} has 1,000 bytes, the manifest says',
          '(truncated)', 'fall_back_to_intact=True')
  _failed(results['init_from'],
          f'checkpoint step 8 in {runs["params"]}/checkpoints is damaged: {mismatch("params")}')
  assert not os.path.exists(tmp_path / 'sft' / 'config.json')  # refused before writing anything
  for command, case in (('generate opt_state', 'opt_state'), ('export', 'params'),
                        ('generate-metrics', 'opt_state')):
    _failed(results[command], 'step 8', mismatch(case), f'{runs[case]}/checkpoints/4: use it')
  assert not os.path.exists(tmp_path / 'hf' / 'config.json')
  _failed(results['generate deleted'], 'model_config/metadata is missing',
          f'{runs["deleted"]}/checkpoints/4: use it instead')
  assert results['generate step 4'].rc == 0, results['generate step 4']
  verify = results['verify']
  assert verify.rc == 1, verify
  assert f'{runs["truncated"]}/checkpoints/4: ok' in verify.out
  assert f'{runs["truncated"]}/checkpoints/8: DAMAGED: {damaged_file} has 1,000 bytes' in verify.out
  assert f'{trained["workdir"]}/checkpoints/8: ok' in verify.out

  # With the switch, the run resumes from the newest intact step and keeps the damaged one aside.
  fallback = _run(*resume('truncated', '--config.checkpoint.fall_back_to_intact=True'))
  assert fallback.rc == 0, fallback
  assert 'Resumed from' in fallback.out and 'at step 4' in fallback.out
  checkpoints = runs['truncated'] / 'checkpoints'
  assert sorted(os.listdir(checkpoints)) == ['12', '4', '8', '8.damaged']
  assert [checksums.check(checkpoints / s).status for s in ('4', '8', '12')] == ['ok'] * 3


@pytest.mark.slow
def test_lora_runs_are_locked_and_checksummed_with_their_base(demo_data, trained, tmp_path):
  """LoRA instruction tuning: two runs at once on one workdir, one refused; the adapter checkpoints
  carry checksums, `verify` follows them to the base they refer to, and a flipped byte in that base is
  refused by generation, by the resumed run and by `verify`, naming the base's step and file."""
  base = _copy(trained, tmp_path, 'base')
  workdir = tmp_path / 'lora'
  lora_run = lambda steps: _sft_args(demo_data, workdir, base, tmp_path / 'chat.jsonl', steps,
                                     '--config.lora.rank=4', '--config.checkpoint.every_steps=2')
  _chat_file(tmp_path)
  args = lora_run(4)
  first, second = sorted(_run_all([args, args]), key=lambda r: r.rc)
  assert first.rc == 0, first
  _failed(second, f'{workdir} is in use by another run: train.sft, pid', 'take_over_lock=True')
  steps = workdir / 'checkpoints'
  assert params_lib.saved_steps(steps) == [2, 4]
  assert params_lib.load_base_pointer(workdir)['base'] == str(base / 'checkpoints' / '8')
  assert [checksums.check(steps / s).status for s in ('2', '4')] == ['ok', 'ok']

  path, offset, length = _chunk(base / 'checkpoints' / '8', 'params.token_embed')
  _flip_byte(path, offset + length // 2)
  damaged = (f'checkpoint step 8 in {base}/checkpoints is damaged: '
             f'{os.path.relpath(path, base / "checkpoints" / "8")}: bytes 0-')
  generate, resume, verify = _run_all([
      ('model.generate', '--ckpt', workdir, '--tokenizer', demo_data['tokenizer'], '--prompt', 'Hi',
       '--max-new-tokens', '2'),
      lora_run(6),
      ('train.checkpoint', 'verify', workdir)])
  _failed(generate, damaged)
  _failed(resume, damaged)
  assert verify.rc == 1, verify
  assert f'{steps}/4: ok' in verify.out
  assert f'{base}/checkpoints/8 (the base model of {steps}/2): DAMAGED' in verify.out, verify
  assert params_lib.saved_steps(steps) == [2, 4]  # the refused resume wrote nothing


@pytest.mark.slow
def test_a_full_disk_fails_the_run_naming_the_step_and_keeps_the_last_checkpoint(demo_data, tmp_path):
  """On a 6 MiB file system the checkpoint of step 4 fits and that of step 8 does not."""
  if os.geteuid() != 0:
    pytest.skip('mounting a small tmpfs needs root')
  disk = tmp_path / 'disk'
  disk.mkdir()
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=6m', 'tmpfs', str(disk)],
                           capture_output=True, text=True, check=False)
  if mounted.returncode:
    pytest.skip(f'cannot mount a tmpfs here: {mounted.stderr.strip()}')
  try:
    workdir = disk / 'run'
    result = _run(*_pretrain_args(demo_data, workdir, 8))
    _failed(result, f'The checkpoint of step 8 was not written to {workdir}/checkpoints',
            'no space left on the device', 'The previous complete checkpoint, step 4, is intact')
    assert len(result.out.splitlines()) < 40, result  # orbax's tracebacks went to the file
    assert params_lib.resolve_step_dir(workdir).name == '4'
    assert checksums.check(workdir / 'checkpoints' / '4').status == 'ok'
  finally:
    subprocess.run(['umount', str(disk)], check=False)


# --------------------------------------------------------------------------------------------------
# Records and command lines

def test_unicode_line_separators_are_part_of_a_jsonl_line(trained, tmp_path):
  """JSONL lines end at '\\n' only: U+2028 and U+2029 inside strings (valid JSON, written by
  json.dumps(ensure_ascii=False)) are text, for pretraining (the fixture trained on them), SFT data and
  held-out data alike."""
  assert 'malformed' not in trained['log']
  chat = tmp_path / 'chat.jsonl'
  record = {'messages': [{'role': 'user', 'content': 'a\u2028b\u2029c'}, {'role': 'assistant', 'content': 'd'}]}
  chat.write_text(json.dumps(record, ensure_ascii=False) + '\n', encoding='utf-8')
  assert len(chat.read_text(encoding='utf-8').splitlines()) == 3  # what str.splitlines would make of it
  cfg = data_config.get_config()
  cfg.format = 'chat'  # what train.sft and model.evaluate generate-metrics both read with
  assert [r for _, _, r in instructions.conversations(str(chat), cfg)] == [record]


@pytest.mark.unit
def test_a_data_file_whose_name_is_not_utf8_is_read_and_named(tmp_path):
  path = tmp_path / os.fsdecode(b'caf\xe9.jsonl')
  path.write_bytes(b'{"text": "hello"}\n')
  read = lambda: list(DatasetIterator(sources.documents('jsonl', str(tmp_path / '*.jsonl')).batch(8)))
  assert [b.tolist() for b in read()] == [[b'hello']]
  path.write_bytes(b'{"text": "hello"}\n[1]\n')
  with pytest.raises(records.BadRecord, match=r'caf\\xe9\.jsonl:2: JSON record has no'):
    read()


@pytest.mark.slow
def test_bad_arguments_name_the_argument(demo_data, trained, tmp_path):
  text = tmp_path / 'text.model'
  text.write_text('this is not a tokenizer\n')
  empty = tmp_path / 'empty.model'
  empty.write_bytes(b'')
  bad_chat = tmp_path / 'bad.jsonl'
  bad_chat.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", '
                      '"content": "a"}]}\n{"messages": [\n')
  list_line = tmp_path / 'list_line.jsonl'
  list_line.write_text('{"text": "a document"}\n["a", "b"]\n')
  ckpt, tok = str(trained['workdir']), demo_data['tokenizer']
  gen = lambda *args: ('model.generate', '--ckpt', ckpt, '--tokenizer', tok, '--prompt', 'hi', *args)
  cases = [
      (gen('--max-new-tokens', '0'), 'flag --max_new_tokens=0: 0 is not a positive integer'),
      (gen('--max-new-tokens', '-1'), 'flag --max_new_tokens=-1: -1 is not a positive integer'),
      (gen('--temperature', '-1'), 'flag --temperature=-1: -1.0 is not a non-negative number'),
      (gen('--mesh', '1,x,1'), "--mesh: expected 3 comma-separated sizes (data,fsdp,tensor, -1 for the "
                               "rest), got '1,x,1'"),
      (gen('--system', 'Be brief.'), '--system needs --chat-template'),
      (('model.generate', '--ckpt', tmp_path / 'none', '--tokenizer', tok, '--prompt', 'hi'),
       f'--ckpt: No checkpoint at {tmp_path / "none"}'),
      (('model.generate', '--ckpt', ckpt, '--tokenizer', text, '--prompt', 'hi'),
       f'--tokenizer: {text} is not a SentencePiece model'),
      (('model.generate', '--ckpt', ckpt, '--tokenizer', empty, '--prompt', 'hi'),
       f'--tokenizer: {empty} is empty (0 bytes)'),
      (('model.evaluate', 'generate-metrics', '--ckpt', ckpt, '--tokenizer', tok, '--chat-template',
        'llama2', '--data', bad_chat), f'--data: {bad_chat}:2: malformed JSON'),
      (('model.convert', 'export', '--ckpt', tmp_path / 'none', '--out', tmp_path / 'hf'),
       f'--ckpt: No checkpoint at {tmp_path / "none"}'),
      (('model.convert', 'import', '--hf-dir', tmp_path, '--out', tmp_path / 'imported'),
       f'--hf-dir: {tmp_path} holds no config.json'),
      (('model.convert', 'check', '--hf-dir', tmp_path), f'--hf-dir: {tmp_path} holds no config.json'),
      (('model.convert', 'import-peft', '--adapter-dir', tmp_path, '--base', ckpt, '--out',
        tmp_path / 'peft'), f'--adapter-dir: {tmp_path} holds no adapter_config.json'),
      (('data.inspect', '--config=configs/tiny.py', f'--config.data.train_files={list_line}',
        f'--config.data.tokenizer={tok}'), f"error: {list_line}:2: JSON record has no 'text' field"),
      (('train.checkpoint', 'verify'), 'verify needs at least one workdir'),
      (('data.tokenizer', '--input', demo_data['eval'], '--out', tmp_path / 't.model', '--vocab_size=0'),
       'flag --vocab_size=0: 0 is not a positive integer'),
      (_pretrain_args(demo_data, tmp_path / 'lr0', 8, None, '--config.optimizer.lr=0'),
       'optimizer.lr must be positive, got 0'),
      (_pretrain_args(demo_data, tmp_path / 'nofile', 8, str(tmp_path / 'missing*.jsonl')),
       f"File pattern '{tmp_path / 'missing*.jsonl'}' matched no file"),
  ]
  results = _run_all([c for c, _ in cases], parallel=4)
  for (_, expected), result in zip(cases, results):
    assert result.rc == 1, result
    assert expected in result.out, (expected, result)
    assert 'Traceback' not in result.out, result
  # A data-file error comes before the run writes its files.
  assert sorted(os.listdir(tmp_path / 'nofile')) == ['errors']


@pytest.mark.unit
def test_a_gs_workdir_is_locked_by_a_create_only_if_absent_object(monkeypatch):
  """gs:// locks, against a stand-in for google-cloud-storage that keeps GCS's rule: a write with
  if_generation_match fails unless the object's generation is that number (0: the object is absent)."""
  import types  # pylint: disable=import-outside-toplevel

  class PreconditionFailed(Exception):
    pass

  bucket = {}  # name -> (generation, text)

  class Blob:
    def __init__(self, name):
      self.name, self.generation = name, None

    def _check(self, if_generation_match):
      if bucket.get(self.name, (0, ''))[0] != if_generation_match:
        raise PreconditionFailed(self.name)

    def upload_from_string(self, text, if_generation_match):
      self._check(if_generation_match)
      self.generation = bucket.get(self.name, (0, ''))[0] + 1
      bucket[self.name] = (self.generation, text)

    def reload(self):
      self.generation = bucket[self.name][0]

    def download_as_text(self, if_generation_match):
      self._check(if_generation_match)
      return bucket[self.name][1]

    def delete(self, if_generation_match):
      self._check(if_generation_match)
      del bucket[self.name]

  client = types.SimpleNamespace(bucket=lambda name: types.SimpleNamespace(blob=Blob))
  storage = types.SimpleNamespace(Client=lambda: client)
  monkeypatch.setitem(sys.modules, 'google.cloud', types.SimpleNamespace(storage=storage))
  monkeypatch.setitem(sys.modules, 'google.cloud.storage', storage)
  exceptions = types.SimpleNamespace(PreconditionFailed=PreconditionFailed)
  monkeypatch.setitem(sys.modules, 'google.api_core', types.SimpleNamespace(exceptions=exceptions))
  monkeypatch.setitem(sys.modules, 'google.api_core.exceptions', exceptions)

  with workdir_lib.RunLock('gs://bucket/runs/a'):
    holder = json.loads(bucket['runs/a/run.lock'][1])
    assert holder['pid'] == os.getpid()
    with pytest.raises(workdir_lib.WorkdirLocked, match=f'gs://bucket/runs/a is in use by another run: '
                       f'.*pid {os.getpid()} on host {socket.gethostname()}'):
      workdir_lib.RunLock('gs://bucket/runs/a').__enter__()
  assert not bucket  # released
  # A lock of a dead process on this host is taken over; another host's only when told to.
  for host, take_over, taken in ((socket.gethostname(), False, True), ('elsewhere', False, False),
                                 ('elsewhere', True, True)):
    bucket['runs/b/run.lock'] = (7, json.dumps({'host': host, 'pid': 2**22 + 1, 'program': 'x'}))
    lock = workdir_lib.RunLock('gs://bucket/runs/b', take_over=take_over)
    if taken:
      with lock:
        assert json.loads(bucket['runs/b/run.lock'][1])['token'] == lock.info['token']
      assert 'runs/b/run.lock' not in bucket
    else:
      with pytest.raises(workdir_lib.WorkdirLocked, match='x, pid 4194305 on host elsewhere'):
        lock.__enter__()


@pytest.mark.unit
def test_checksums_name_the_damaged_block_and_hosts_split_the_reading(tmp_path, monkeypatch):
  monkeypatch.setattr(checksums, 'BLOCK_BYTES', 1000)  # 64 MiB and 1 MiB in use
  monkeypatch.setattr(checksums, 'QUICK_BYTES', 100)
  step = tmp_path / '5'
  (step / 'state').mkdir(parents=True)
  (step / 'state' / 'big').write_bytes(bytes(range(256)) * 12)  # 3,072 bytes: 4 blocks
  (step / 'meta').write_text('{}')
  manifest = checksums.write_manifest(step)
  assert [len(f['blocks']) for f in manifest['files'].values()] == [1, 4]
  assert checksums.check(step).status == 'ok'
  _flip_byte(step / 'state' / 'big', 2500)
  problem = 'state/big: bytes 2,000-3,000 do not match their checksum'
  assert checksums.check(step).problems[0].startswith(problem)
  # Hosts read every n-th block: exactly one of two finds it; a quick check reads no large file.
  assert [checksums.check(step, share=(i, 2)).status for i in range(2)] == ['ok', 'damaged']
  assert checksums.check(step, quick=True).status == 'ok'
  message = str(checksums.DamagedCheckpoint(step, checksums.check(step).problems))
  assert message.startswith(f'checkpoint step 5 in {tmp_path} is damaged: {problem}')
  os.remove(step / checksums.MANIFEST)
  assert checksums.check(step).status == 'unverified'

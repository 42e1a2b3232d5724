"""Fault battery, with real processes and real signals: preemption (SIGTERM) at awkward moments for
both entry points and across two hosts, and SIGKILL in the middle of an asynchronous save. A resumed
run must match an uninterrupted one bit for bit (same losses at every step, same final parameters).
"""

import json
import os
import signal
import socket
import time

import jax
import numpy as np
import pytest

from model.weights import params as params_lib
from tests.builders import losses as _losses, micro_flags
from tests.cli import finish, start_cli, start_python

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STEPS = 30
COMMON = micro_flags() + [
    f'--config.train.steps={STEPS}', '--config.train.batch_size=8', '--config.train.seq_len=64',
    '--config.train.log_every=1', '--config.train.eval_every=5', '--config.train.eval_max_batches=1',
    '--config.train.eval_at_start=False', '--config.checkpoint.every_steps=4',
    '--config.optimizer.warmup_steps=2', f'--config.optimizer.decay_steps={STEPS}']


def _pretrain_flags(demo_data):
  return ['--config=configs/tiny.py', '--config.train.grad_accum_steps=2',
          f'--config.data.train_files={demo_data["train"]}', f'--config.data.eval_files={demo_data["eval"]}',
          f'--config.data.tokenizer={demo_data["tokenizer"]}'] + COMMON


def _launch(module, workdir, flags, devices=2, env=None, runner=None):
  os.makedirs(workdir, exist_ok=True)
  log = os.path.join(workdir, f'log-{time.time_ns()}.txt')
  args = [module, f'--workdir={workdir}', *flags]
  if runner:
    return start_python(runner, *args, log=log, devices=devices, **(env or {}))
  return start_cli(*args, log=log, devices=devices, **(env or {}))


def _finish(proc, timeout=300):
  rc, out = finish(proc, timeout)
  assert rc == 0, out[-4000:]
  return out


def _steps_logged(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [r['step'] for r in map(json.loads, f.read().splitlines()[:-1] or []) if 'loss' in r]


def _wait_until(condition, proc, timeout=240):
  start = time.time()
  while not condition():
    assert proc.poll() is None, f'process ended before the fault could be injected: {proc.log_path}'
    assert time.time() - start < timeout, 'timed out waiting to inject the fault'
    time.sleep(0.01)


def _params(workdir):
  cfg = params_lib.load_model_config(workdir)
  return jax.device_get(params_lib.load_params(workdir, params_lib.abstract_params_on(cfg)))


def _stopped_at(workdir):
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    return json.load(f).get('stopped_at')


def _assert_same_run(reference, resumed):
  a, b = _losses(reference), _losses(resumed)
  assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
  assert [b[s] for s in sorted(a)] == [a[s] for s in sorted(a)]  # bit for bit
  for x, y in zip(jax.tree.leaves(_params(reference)), jax.tree.leaves(_params(resumed))):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope='module')
def pretrain_reference(demo_data, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('pretrain_reference'))
  _finish(_launch('train.pretrain', workdir, _pretrain_flags(demo_data)))
  return workdir


def test_pretrain_preempted_twice_resumes_bit_exactly(demo_data, pretrain_reference, tmp_path):
  workdir, flags = str(tmp_path / 'run'), _pretrain_flags(demo_data)
  # 1. SIGTERM mid-run: every step here is a 2-microbatch accumulation, so the signal lands inside one.
  proc = _launch('train.pretrain', workdir, flags)
  _wait_until(lambda: max(_steps_logged(workdir), default=0) >= 3, proc)
  proc.send_signal(signal.SIGTERM)
  out = _finish(proc)
  first = _stopped_at(workdir)
  assert 3 <= first < STEPS and f'Stopped at step {first} (SIGTERM)' in out
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', str(first)))
  # 2. SIGTERM right after an evaluation (eval_every=5).
  proc = _launch('train.pretrain', workdir, flags)
  evals = os.path.join(workdir, 'eval_results.json')
  after = (first // 5 + 1) * 5
  _wait_until(lambda: os.path.exists(evals) and after in [e['step'] for e in json.load(open(evals))], proc)
  proc.send_signal(signal.SIGTERM)
  _finish(proc)
  second = _stopped_at(workdir)
  assert after <= second < STEPS
  # 3. Resume to the end.
  _finish(_launch('train.pretrain', workdir, flags))
  assert _stopped_at(workdir) is None
  _assert_same_run(pretrain_reference, workdir)


def test_sigkill_during_async_save_resumes_from_last_complete_checkpoint(
    demo_data, pretrain_reference, tmp_path):
  workdir, flags = str(tmp_path / 'run'), _pretrain_flags(demo_data)
  marker = str(tmp_path / 'hanging')
  proc = _launch('train.pretrain', workdir, flags, runner='tests/fault_runner.py',
                 env={'FLAXLM_HANG_COMMIT_OF_STEP': '12', 'FLAXLM_HANG_MARKER': marker})
  _wait_until(lambda: os.path.exists(marker), proc)
  time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  ckpts = os.listdir(os.path.join(workdir, 'checkpoints'))
  assert '12' not in ckpts and any(name.startswith('12.orbax-checkpoint-tmp') for name in ckpts)
  assert params_lib.resolve_step_dir(workdir).name == '8'  # the partial step is never picked
  out = _finish(_launch('train.pretrain', workdir, flags))
  assert 'incomplete checkpoint' in out and 'Resumed from' in out and 'at step 8' in out
  _assert_same_run(pretrain_reference, workdir)


def _sft_flags(demo_data, sft_files, init_from):
  return ['--config=configs/sft_tiny.py', f'--config.init_from={init_from}',
          f'--config.data.train_files={sft_files["train"]}', f'--config.data.eval_files={sft_files["eval"]}',
          f'--config.data.tokenizer={demo_data["tokenizer"]}', '--config.train.seq_len=128'] + [
              f for f in COMMON if 'seq_len' not in f]


@pytest.fixture(scope='module')
def sft_files(demo_data, tmp_path_factory):
  from data import demo_corpus  # pylint: disable=import-outside-toplevel
  out = str(tmp_path_factory.mktemp('sft_data'))
  demo_corpus.write_instruction_task(os.path.join(demo_data['dir'], 'data'), out, 300, 30)
  return {'train': os.path.join(out, 'train.jsonl'), 'eval': os.path.join(out, 'eval.jsonl')}


def test_sft_preempted_resumes_bit_exactly(demo_data, sft_files, pretrain_reference, tmp_path):
  flags = _sft_flags(demo_data, sft_files, pretrain_reference)
  reference, workdir = str(tmp_path / 'reference'), str(tmp_path / 'run')
  ref_proc = _launch('train.sft', reference, flags)
  proc = _launch('train.sft', workdir, flags)
  _wait_until(lambda: max(_steps_logged(workdir), default=0) >= 6, proc)
  proc.send_signal(signal.SIGINT)  # Ctrl-C behaves like SIGTERM
  _finish(proc)
  assert 6 <= _stopped_at(workdir) < STEPS
  _finish(ref_proc)
  _finish(_launch('train.sft', workdir, flags))
  _assert_same_run(reference, workdir)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_hosts_agree_on_the_stop_step_and_resume(tmp_path):
  flags = ['--config=configs/tiny.py', '--config.data.format=synthetic', '--config.mesh.data=2',
           '--config.mesh.fsdp=-1'] + [f for f in COMMON if 'vocab_size' not in f]

  def pair(workdir):
    port = _free_port()
    return [_launch('train.pretrain', workdir, flags + [
        f'--config.distributed.coordinator_address=127.0.0.1:{port}',
        '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}'])
            for i in range(2)]

  reference, workdir = str(tmp_path / 'reference'), str(tmp_path / 'run')
  single = _launch('train.pretrain', reference, flags, devices=4)
  procs = pair(workdir)
  _wait_until(lambda: max(_steps_logged(workdir), default=0) >= 3, procs[0])
  procs[1].send_signal(signal.SIGTERM)  # only one host is told; both must stop at the same step
  outs = [_finish(p) for p in procs]
  stopped = _stopped_at(workdir)
  assert 3 <= stopped < STEPS
  assert all(f'Stopped at step {stopped}' in out for out in outs)
  data_dir = os.path.join(workdir, 'checkpoints', str(stopped), 'data')
  assert sorted(os.listdir(data_dir))[-2:] == ['process_0-of-2.bin', 'process_1-of-2.bin']
  _finish(single)
  for p in pair(workdir):
    _finish(p)
  a, b = _losses(reference), _losses(workdir)
  assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([b[s] for s in sorted(a)], [a[s] for s in sorted(a)], rtol=1e-5)

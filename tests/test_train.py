"""End to end: the pretraining entry point resumes exactly, and runs the same on two processes."""

import os
import socket

import jax
import numpy as np
import pytest

from data.pretrain import PretrainData
from tests.builders import losses as _losses, run_config
from tests.cli import finish, start_cli
from train import checkpoint, loop
from train import run as run_lib

pytestmark = pytest.mark.e2e


def _config(demo_data, steps):
  # A fixed schedule, so that a run stopped at step k follows the same learning rates as a longer one.
  return run_config('tiny', train=dict(steps=steps, seq_len=64),
                    data=dict(train_files=demo_data['train'], eval_files=demo_data['eval'],
                              tokenizer=demo_data['tokenizer']),
                    optimizer=dict(decay_steps=6, warmup_steps=2, lr=1e-2), checkpoint=dict(every_steps=3))


def _final_params(config, workdir, step):
  run = run_lib.Run(config)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=3)
  state, _ = ckpt.restore(step, run.abstract_state())
  return jax.device_get(state.params)


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(demo_data, tmp_path, monkeypatch):
  # The interrupted run's workdir is relative, as in the README's commands (orbax needs absolute paths).
  monkeypatch.chdir(tmp_path)
  straight, interrupted = str(tmp_path / 'straight'), os.path.join('runs', 'interrupted')
  loop.train(_config(demo_data, 6), straight, PretrainData(_config(demo_data, 6).data, 64))
  loop.train(_config(demo_data, 4), interrupted, PretrainData(_config(demo_data, 4).data, 64))
  final = loop.train(_config(demo_data, 6), interrupted, PretrainData(_config(demo_data, 6).data, 64))
  assert 'eval_loss' in final

  a, b = _losses(straight), _losses(interrupted)
  assert sorted(a) == sorted(b) == list(range(1, 7))
  np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=1e-6)
  pa, pb = (_final_params(_config(demo_data, 6), w, 6) for w in (straight, interrupted))
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.unit
def test_a_save_that_fails_in_the_background_fails_the_run(tmp_path):
  """Orbax's background threads only log a failed write; waiting for the save must raise."""
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'), keep=2)
  ckpt._manager.save = lambda step, args, force: True  # accepted, then nothing written
  state = {'w': np.ones(3, np.float32)}
  assert ckpt.save(5, state, None)
  with pytest.raises(IOError, match='checkpoint of step 5 was not written to ' + str(tmp_path)):
    ckpt.save(10, state, None)  # the next save finds it out
  assert ckpt.save(10, state, None)  # reported once
  with pytest.raises(IOError, match='checkpoint of step 10 was not written'):
    ckpt.wait()  # and so does the end of the run
  ckpt.close()


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  common = ['--config=configs/tiny.py',
            '--config.data.format=synthetic', '--config.train.steps=4', '--config.train.log_every=1',
            '--config.train.batch_size=8', '--config.train.seq_len=32', '--config.mesh.data=2',
            '--config.mesh.fsdp=-1', '--config.checkpoint.every_steps=2']

  def launch(workdir, devices, extra=()):
    return start_cli('train.pretrain', *common, f'--workdir={workdir}', *extra, devices=devices)

  port = _free_port()
  single = launch(tmp_path / 'single', 4)
  pair = [launch(tmp_path / 'pair', 2, [f'--config.distributed.coordinator_address=127.0.0.1:{port}',
                                        '--config.distributed.num_processes=2',
                                        f'--config.distributed.process_id={i}'])
          for i in range(2)]
  for p in [single] + pair:
    rc, out = finish(p, timeout=300)
    assert rc == 0, out[-3000:]
  a, b = _losses(tmp_path / 'single'), _losses(tmp_path / 'pair')
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5)
  # Each process wrote its own input position into the shared checkpoint.
  data_dir = tmp_path / 'pair' / 'checkpoints' / '4' / 'data'
  assert sorted(os.listdir(data_dir))[-2:] == ['process_0-of-2.bin', 'process_1-of-2.bin']

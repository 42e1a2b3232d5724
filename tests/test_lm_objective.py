"""Pretraining and instruction tuning compute exactly what they computed before the train step took its
objective from the config (issue 15, preference tuning): the same losses, bit for bit.

The expected values were recorded by running these very runs on the code before that change (float32
on CPU, 8 fake devices, jax 0.10.2); the data are made here (no corpus that varies with the Python
version), so the runs are the same wherever the suite runs. Another JAX or XLA version may round the
last bits differently (jax 0.12 does, at one step): there the values must agree to 1e-5 relative, far
below what any change of objective moves them. When the pinned JAX is upgraded, record the values
again from the previous commit (`python tests/test_lm_objective.py` prints them).
"""

import json
import os
import random
import sys

import jax
import pytest

from data.synthetic import SyntheticData
from tests.builders import MICRO, run_config
from train import loop

pytestmark = pytest.mark.e2e

WORDS = ('alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud field '
         'window garden silver yellow quiet rapid gentle').split()
MODEL = dict(MICRO, dtype='float32', scan_layers=False)
# float.hex() of the logged values: train loss at steps 1-3, held-out loss at steps 0 and 3.
RECORDED_WITH_JAX = '0.10.2'  # requirements.txt's
EXPECTED = {
    'pretrain': ['0x1.90157e0000000p+2', '0x1.8c3d540000000p+2', '0x1.886e040000000p+2',
                 '0x1.9068520000000p+2', '0x1.8524ec0000000p+2'],
    'sft': ['0x1.92f7c80000000p+2', '0x1.80cc060000000p+2', '0x1.6a92460000000p+2',
            '0x1.8fdf700000000p+2', '0x1.615b460000000p+2'],
}


def _config(steps=3):
  return run_config(model=MODEL, train=dict(steps=steps, seq_len=64, eval_at_start=True),
                    optimizer=dict(lr=1e-2, warmup_steps=1), checkpoint=dict(async_save=False))


def _sft_files(root):
  rng = random.Random(0)
  records = []
  for _ in range(48):
    words = rng.sample(WORDS, rng.randint(3, 6))
    records.append({'messages': [{'role': 'user', 'content': 'Last word: ' + ' '.join(words)},
                                 {'role': 'assistant', 'content': words[-1]}]})
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, 'chat.jsonl'), 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)
  from data.tokenizer import train_bpe  # pylint: disable=import-outside-toplevel
  texts = [m['content'] for r in records for m in r['messages']] * 4
  train_bpe(texts, os.path.join(root, 'tokenizer.json'), 300,
            ['<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>'])
  return os.path.join(root, 'chat.jsonl'), root


def _logged(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  return ([r['loss'] for r in records if 'loss' in r]
          + [r['eval_loss'] for r in records if 'eval_loss' in r])


def run_pretrain(workdir):
  c = _config()
  c.data.format = 'synthetic'
  loop.train(c, workdir, SyntheticData(c.data.seed, c.train.seq_len, c.model.vocab_size))
  return _logged(workdir)


def run_sft(workdir):
  from data.sft import SFTData  # pylint: disable=import-outside-toplevel  (TensorFlow)
  files, tokenizer = _sft_files(os.path.join(workdir, 'data'))
  c = _config()
  c.data.update(dict(format='chat', chat_template='llama3', train_files=files, eval_files=files,
                     tokenizer=tokenizer))
  loop.train(c, workdir, SFTData(c.data, c.train.seq_len))
  return _logged(workdir)


@pytest.mark.parametrize('name,run', [('pretrain', run_pretrain), ('sft', run_sft)])
def test_losses_are_bit_identical_to_before(tmp_path, name, run):
  got = run(str(tmp_path / name))
  assert len(got) == 5
  if jax.__version__ == RECORDED_WITH_JAX:
    assert [float.hex(x) for x in got] == EXPECTED[name], got
  else:
    assert got == pytest.approx([float.fromhex(h) for h in EXPECTED[name]], rel=1e-5, abs=0)


if __name__ == '__main__':  # prints EXPECTED for the code at hand
  import tempfile  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as tmp:
    print({name: [float.hex(x) for x in fn(os.path.join(tmp, name))]
           for name, fn in (('pretrain', run_pretrain), ('sft', run_sft))}, file=sys.stderr)

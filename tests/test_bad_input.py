"""Bad input and bad config: each case fails before any compute with a message naming what is wrong,
or, where configured, is skipped or repaired and counted."""

import json
import re

import pytest

from configs import tiny
from data.pretrain import PretrainData
from data.records import BadRecord
from data.synthetic import SyntheticData
from tests.builders import run_config
from train import loop, start as start_lib, validate
from train import run as run_lib

pytestmark = pytest.mark.unit


def _data_config(demo_data, files, **overrides):
  c = tiny.get_config()
  c.data.update(dict(format='lines', train_files=files, eval_files='', tokenizer=demo_data['tokenizer'],
                     shuffle_buffer=1))
  c.data.update(overrides)
  return c.data


def _first_batch(demo_data, files, **overrides):
  """Reads the files once, in order (the eval path), so that counts are per single pass."""
  data = PretrainData(_data_config(demo_data, '', eval_files=files, **overrides), seq_len=32)
  return data.eval_batches(0, 1, 2, max_batches=0), data.stats()


def test_invalid_utf8_names_file_and_byte_offset(demo_data, tmp_path):
  path = tmp_path / 'bad.txt'
  path.write_bytes(b'a fine first line\nsecond line \xff\xfe broken\nthird line\n')
  with pytest.raises(BadRecord, match=re.escape(f'{path}:2: invalid UTF-8 at byte offset 30')):
    _first_batch(demo_data, str(path))
  _, stats = _first_batch(demo_data, str(path), invalid_utf8='replace')
  assert stats['invalid_utf8_replaced'] == 1


def test_invalid_utf8_in_a_whole_file_document(demo_data, tmp_path):
  path = tmp_path / 'doc.txt'
  path.write_bytes(b'some text\nmore \xc3\x28 text')
  with pytest.raises(BadRecord, match=re.escape(f'{path}: invalid UTF-8 at byte offset 15')):
    _first_batch(demo_data, str(path), format='files')


def test_empty_and_whitespace_documents_are_skipped_and_counted(demo_data, tmp_path):
  path = tmp_path / 'docs.jsonl'
  docs = ['real text here', '', '   \n\t ', 'more real text'] * 5
  path.write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs))
  _, stats = _first_batch(demo_data, str(path), format='jsonl')
  assert stats['skipped_empty_documents'] == 10


def test_empty_file_is_an_error(demo_data, tmp_path):
  (tmp_path / 'a.txt').write_text('some text\n')
  (tmp_path / 'b.txt').write_text('')
  with pytest.raises(ValueError, match=re.escape(f'1 empty input file(s): {tmp_path / "b.txt"}')):
    _first_batch(demo_data, str(tmp_path / '*.txt'))


def test_glob_matching_no_file_is_an_error(demo_data, tmp_path):
  with pytest.raises(FileNotFoundError, match="'.*/nothing-\\*.txt' matched no file"):
    _first_batch(demo_data, str(tmp_path / 'nothing-*.txt'))


def test_record_over_the_size_limit(demo_data, tmp_path):
  path = tmp_path / 'big.txt'
  path.write_text('short line\n' + 'x' * 5000 + '\nshort again\n')
  with pytest.raises(BadRecord, match=re.escape(f'{path}:2: record of 5,000 bytes exceeds '
                                                'config.data.max_record_bytes (4,096)')):
    _first_batch(demo_data, str(path), max_record_bytes=4096)
  _, stats = _first_batch(demo_data, str(path), max_record_bytes=4096, skip_bad_records=True)
  assert stats['skipped_bad_records'] == 1


def _synthetic_config(**train):
  return run_config(data=dict(format='synthetic'), train={**dict(steps=2, seq_len=32), **train})


@pytest.mark.e2e
def test_workdir_of_a_different_run_is_refused_unless_overridden(tmp_path):
  workdir = str(tmp_path / 'run')
  loop.train(_synthetic_config(), workdir, SyntheticData(0, 32, 512))
  changed = _synthetic_config(steps=4)
  changed.optimizer.lr = 1e-3
  with pytest.raises(validate.ConfigError, match=r'different config.*\n  optimizer.lr: 0.0003 -> 0.001'):
    loop.train(changed, workdir, SyntheticData(0, 32, 512))
  # Training longer is a normal resume, not a different run.
  assert loop.train(_synthetic_config(steps=3), workdir, SyntheticData(0, 32, 512))['loss'] > 0
  changed.train.override_workdir_config = True
  assert loop.train(changed, workdir, SyntheticData(0, 32, 512))['loss'] > 0


@pytest.mark.e2e
def test_init_from_a_checkpoint_of_another_shape_names_the_parameter(tmp_path):
  workdir = str(tmp_path / 'pre')
  loop.train(_synthetic_config(), workdir, SyntheticData(0, 32, 512))
  other = _synthetic_config()
  other.model.mlp_dim = 256
  expected = ("parameter ['layers']['mlp']['down_proj'] has shape (2, 128, 64) in the checkpoint but "
              'the model expects (2, 256, 64)')
  with pytest.raises(validate.ConfigError, match=re.escape(expected)):
    start_lib.load_init_from(run_lib.Run(other), workdir)

"""notebooks/quickstart.ipynb runs top to bottom (quick settings, CPU) and is stored without outputs."""

import glob
import json
import os

import pytest

from tests.cli import ROOT

pytestmark = pytest.mark.unit

NOTEBOOK = os.path.join(ROOT, 'notebooks', 'quickstart.ipynb')


def test_notebook_is_stored_without_outputs():
  with open(NOTEBOOK, encoding='utf-8') as f:
    notebook = json.load(f)
  code = [c for c in notebook['cells'] if c['cell_type'] == 'code']
  assert code
  dirty = [i for i, c in enumerate(code) if c.get('outputs') or c.get('execution_count') is not None]
  assert not dirty, f'code cells {dirty} hold outputs; clear them before committing'


@pytest.mark.e2e
@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  work = tmp_path / 'quickstart'
  monkeypatch.setenv('FLAXLM_QUICK', '1')
  monkeypatch.setenv('FLAXLM_WORKDIR', str(work))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.delenv('XLA_FLAGS', raising=False)  # one CPU device, as on a laptop or Colab
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=300, kernel_name='python3',
                                   resources={'metadata': {'path': os.path.join(ROOT, 'notebooks')}})
  client.execute()  # raises CellExecutionError, with the cell and its output, if any cell fails

  text = '\n'.join(o.get('text', '') for c in notebook.cells if c.cell_type == 'code'
                   for o in c.outputs if o.get('output_type') == 'stream')
  # Each step ran and said what it did.
  assert 'Wrote' in text and 'train and 16 held-out questions' in text
  assert 'tokens, bos=1 eos=2' in text
  assert 'step 30/30' in text and 'step 20/20' in text
  assert 'Before instruction tuning: 16 held-out answers: exact_match' in text
  assert 'After instruction tuning: 16 held-out answers: exact_match' in text
  assert '|flaxlm_words|' in text and 'byte_perplexity' in text  # lm-eval's table
  assert 'new tokens in' in text  # model.generate's summary
  assert 'held-out loss' in text and 'tokens/s' in text  # train.plot's summary lines
  assert 'fits' in text  # train.compile's verdict
  assert 'llama2_7b' in text and '6,738,415,616' in text  # the config table and 7B parameter count
  # ... and left its results where the notebook says.
  for run, last_step in (('pretrain', 30), ('sft', 20)):
    with open(work / run / 'eval_results.json', encoding='utf-8') as f:
      assert json.load(f)[-1]['step'] == last_step
    with open(work / run / 'task_metrics.json', encoding='utf-8') as f:
      assert 0.0 <= json.load(f)['metrics']['exact_match'] <= 100.0
  with open(work / 'sft' / 'eval_results.json', encoding='utf-8') as f:
    assert 'eval_rougeL' in json.load(f)[-1]  # task metrics during tuning
  assert glob.glob(str(work / 'lm_eval' / '*' / 'results_*.json'))
  png = (work / 'loss.png').read_bytes()
  assert png.startswith(b'\x89PNG') and len(png) > 20_000
  images = [o for c in notebook.cells if c.cell_type == 'code' for o in c.outputs
            if 'image/png' in o.get('data', {})]
  assert len(images) == 1  # the curves, inline

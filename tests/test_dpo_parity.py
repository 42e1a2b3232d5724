"""Preference tuning against TRL itself: on a tiny Llama made in transformers and imported into flaxlm,
and the same conversational pairs rendered by the same chat template, flaxlm's tokens and completion
masks are TRL DPOTrainer's, its per-pair log-probabilities (policy and reference) and the loss of each
loss type equal TRL's to 1e-4 (float32), and one optimizer step (AdamW, clipping, constant learning
rate) moves the DPO loss as TRL's step does. SimPO is checked against TRL's CPOTrainer loss on the same
average log-probabilities."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='torch is not installed (the newest-releases set on Python '
                            '3.12 has only CUDA builds of torch on PyPI)')
transformers = pytest.importorskip('transformers', reason='transformers is not installed')
trl = pytest.importorskip('trl', reason='trl is not installed')
datasets = pytest.importorskip('datasets', reason='datasets is not installed')

from configs import default
from data import chat
from data.preference import PreferenceData
from model import convert
from model.weights import params as params_lib
from tests.hf_models import random_llama
from tests.tokenizers_for_tests import make_hf_tokenizer
from train import dpo, reference_pass, step

pytestmark = [pytest.mark.parity, pytest.mark.e2e]

VOCAB = 400
PAIRS = [
    ('What does the for statement do?', 'It iterates over a sequence.', 'It is a number.'),
    ('What does a class definition make?', 'A class object.', 'Nothing at all, ever.'),
    ('Which word ends this sentence: the loop ends here', 'here', 'loop'),
    ('How many words are in: a b c', '3', 'seven'),
]
LOSSES = {'sigmoid': dict(beta=0.1), 'robust': dict(beta=0.5, label_smoothing=0.1), 'ipo': dict(beta=0.1)}
LR = 1e-3


def _hf(folder):
  return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """Tokenizer folder (with the llama3 template as its chat_template.jinja), policy and reference
  models (transformers folders and flaxlm imports), and the pairs as a JSONL file."""
  root = tmp_path_factory.mktemp('dpo_parity')
  tok = make_hf_tokenizer(root / 'tok', VOCAB, 'llama3')
  shutil.copy(os.path.join(chat.TEMPLATE_DIR, 'llama3.jinja'), root / 'tok' / 'chat_template.jinja')
  for name, seed in (('policy', 0), ('reference', 1)):
    random_llama(VOCAB, seed).save_pretrained(root / name)
    convert.import_hf(str(root / name), str(root / f'{name}_ckpt'), 'float32', log=None)
  records = [{'prompt': [{'role': 'user', 'content': p}], 'chosen': [{'role': 'assistant', 'content': c}],
              'rejected': [{'role': 'assistant', 'content': r}]} for p, c, r in PAIRS]
  with open(root / 'pairs.jsonl', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)
  return {'root': root, 'tok': tok, 'records': records}


def _config(setup, loss='sigmoid', **dpo_options):
  c = default.get_config()
  c.model.update(dict(dtype='float32'))
  c.train.update(dict(objective='dpo', steps=1, batch_size=8, seq_len=128, log_every=1, eval_every=0,
                      eval_at_start=False, loss_chunk_len=0))
  c.optimizer.update(dict(lr=LR, warmup_steps=0, min_lr_ratio=1.0, b1=0.9, b2=0.999, eps=1e-8,
                          weight_decay=0.0, grad_clip=1.0))
  c.checkpoint.async_save = False
  c.data.update(dict(format='preference', train_files=str(setup['root'] / 'pairs.jsonl'),
                     tokenizer=setup['tok'], chat_template='tokenizer', packing=False))
  c.dpo.update(dict(loss=loss, beta=0.1, label_smoothing=0.0, **dpo_options))
  c.init_from = str(setup['root'] / 'policy_ckpt')
  return c


def _trl_trainer(setup, loss='sigmoid', beta=0.1, label_smoothing=0.0):
  tokenizer = transformers.AutoTokenizer.from_pretrained(setup['tok'])
  args = trl.DPOConfig(output_dir=str(setup['root'] / 'trl'), max_steps=1, per_device_train_batch_size=len(PAIRS),
                       learning_rate=LR, lr_scheduler_type='constant', beta=beta, loss_type=[loss],
                       label_smoothing=label_smoothing, bf16=False, use_cpu=True,
                       gradient_checkpointing=False, max_grad_norm=1.0, report_to='none', logging_steps=1,
                       save_strategy='no', seed=0, max_length=128, disable_tqdm=True)
  return trl.DPOTrainer(model=_hf(setup['root'] / 'policy'), ref_model=_hf(setup['root'] / 'reference'),
                        args=args, train_dataset=datasets.Dataset.from_list(setup['records']),
                        processing_class=tokenizer)


@pytest.fixture(scope='module')
def trl_side(setup):
  """TRL's batch, per-pair log-probabilities of policy and reference, and each loss type's loss."""
  trainer = _trl_trainer(setup)
  batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
  policy = np.stack([t.numpy() for t in trainer.compute_ref_log_probs(trainer.model, batch)], -1)
  reference = np.stack([t.numpy() for t in trainer.compute_ref_log_probs(trainer.ref_model, batch)], -1)
  losses = {}
  for loss, options in LOSSES.items():
    t = _trl_trainer(setup, loss, **options)
    t.model.train()
    with torch.no_grad():
      losses[loss] = t.compute_loss(t.model, batch).item()
  return {'batch': batch, 'policy': policy, 'reference': reference, 'losses': losses, 'trainer': trainer}


def _ours(setup, ckpt, config):
  """Our pipeline's rows and the reference pass of `ckpt` over them: ([pairs, 2] log-probabilities,
  the PreferenceData)."""
  data = PreferenceData(config.data, config.train.seq_len)
  run = dpo.run.Run(config, tokenizer_vocab=data.vocab_size)
  params = params_lib.load_params(ckpt, run.abstract_state().params)
  return reference_pass.compute(run, data, params), data, run, params


def test_tokens_and_completion_masks_are_trls(setup, trl_side):
  data = PreferenceData(_config(setup).data, 128)
  batch = trl_side['batch']
  n = len(PAIRS)
  for i, (ids, mask, n_chosen) in enumerate(data.train_pairs):
    for side, (start, stop) in enumerate(((0, n_chosen), (n_chosen, len(ids)))):
      row = i + side * n
      length = int(batch['attention_mask'][row].sum())
      assert ids[start:stop].tolist() == batch['input_ids'][row, :length].tolist()
      assert mask[start:stop].tolist() == batch['completion_mask'][row, :length].tolist()


def test_log_probabilities_and_losses_equal_trls(setup, trl_side):
  config = _config(setup)
  policy, data, run, params = _ours(setup, setup['root'] / 'policy_ckpt', config)
  reference = _ours(setup, setup['root'] / 'reference_ckpt', config)[0]
  np.testing.assert_allclose(policy, trl_side['policy'], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(reference, trl_side['reference'], rtol=1e-5, atol=1e-4)

  batch = reference_pass.join(next(data.ordered_batches('train_pass', 0, 1, 8)), reference)
  for loss, options in LOSSES.items():
    objective = step.Preference(run.model, loss, **options)
    sums = jax.jit(objective.sums)(params, batch)
    assert float(sums['weight']) == len(PAIRS)
    np.testing.assert_allclose(float(sums['loss'] / sums['weight']), trl_side['losses'][loss], atol=1e-4,
                               err_msg=loss)

  # With sft_weight (RPO), plus the chosen answers' mean negative log-likelihood per pair.
  counts = np.array([[m[:n].sum(), m[n:].sum()] for _, m, n in data.train_pairs], np.float32)
  sums = jax.jit(step.Preference(run.model, sft_weight=0.5).sums)(params, batch)
  expected = trl_side['losses']['sigmoid'] + 0.5 * np.mean(-trl_side['policy'][:, 0] / counts[:, 0])
  np.testing.assert_allclose(float(sums['loss'] / sums['weight']), expected, atol=1e-4)

  # SimPO: TRL's CPO loss of the same average log-probabilities (no reference).
  from trl.experimental.cpo import CPOConfig, CPOTrainer  # pylint: disable=import-outside-toplevel
  tokenizer = transformers.AutoTokenizer.from_pretrained(setup['tok'])
  tokenizer.pad_token = tokenizer.eos_token
  cpo = CPOTrainer(model=_hf(setup['root'] / 'policy'), processing_class=tokenizer,
                   args=CPOConfig(output_dir=str(setup['root'] / 'cpo'), loss_type='simpo', cpo_alpha=0.0,
                                  beta=2.0, simpo_gamma=1.0, label_smoothing=0.1, bf16=False, use_cpu=True,
                                  report_to='none', max_length=64),
                   train_dataset=datasets.Dataset.from_list(
                       [{'prompt': 'a', 'chosen': ' b', 'rejected': ' c'}]))
  average = torch.tensor(trl_side['policy'] / counts)
  expected = cpo.cpo_loss(average[:, 0], average[:, 1])[0].mean().item()
  objective = step.Preference(run.model, 'simpo', beta=2.0, simpo_gamma=1.0, label_smoothing=0.1)
  sums = jax.jit(objective.sums)(params, batch)
  np.testing.assert_allclose(float(sums['loss'] / sums['weight']), expected, atol=1e-4)


def test_one_step_moves_the_loss_as_trls(setup, trl_side, tmp_path):
  trainer = trl_side['trainer']
  batch = trl_side['batch']
  trainer.model.train()
  with torch.no_grad():
    before = trainer.compute_loss(trainer.model, batch).item()
  trainer.train()
  logged = trainer.state.log_history[0]
  with torch.no_grad():
    after = trainer.compute_loss(trainer.model, batch).item()

  config = _config(setup)
  config.init_from = str(setup['root'] / 'policy_ckpt')
  # The reference is another model than the starting one here (as TRL's ref_model): its table, in the
  # workdir as the run's own, then the DPO run on it.
  reference, data = _ours(setup, setup['root'] / 'reference_ckpt', config)[:2]
  workdir = str(tmp_path / 'run')
  reference_pass.save(workdir, data.fingerprint(), config.init_from, reference)
  metrics = dpo.train(config, workdir, data)
  np.testing.assert_allclose(metrics['loss'], before, atol=1e-4)
  for ours, theirs in (('rewards/chosen', 'rewards/chosen'), ('rewards/margins', 'rewards/margins'),
                       ('logps/chosen', 'logps/chosen'), ('logps/rejected', 'logps/rejected')):
    np.testing.assert_allclose(metrics[ours], logged[theirs], atol=1e-4, err_msg=ours)
  np.testing.assert_allclose(metrics['grad_norm'], logged['grad_norm'], rtol=1e-3)

  run = dpo.run.Run(config, tokenizer_vocab=data.vocab_size)
  params = params_lib.load_params(workdir, run.abstract_state().params)
  step_batch = reference_pass.join(next(data.ordered_batches('train_pass', 0, 1, 8)), reference)
  sums = jax.jit(step.Preference(run.model).sums)(params, step_batch)
  ours_after = float(sums['loss'] / sums['weight'])
  assert after < before and ours_after < before
  np.testing.assert_allclose(ours_after, after, rtol=2e-3)

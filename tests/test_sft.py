"""Instruction tuning: input checks, loss masking, packing isolation, init_from, exact resume; task
metrics of generated answers and early stopping with the best checkpoint."""

import dataclasses
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sft_tiny
from data import demo_corpus
from data.records import BadRecord
from data.sft import SFTData
from model import ModelConfig, Transformer
from model.weights import params as params_lib
from tests.builders import losses as _losses, micro_model_config, run_config
from train import evaluation, loop, start as start_lib, step as step_lib, validate
from train import run as run_lib

pytestmark = pytest.mark.unit

SEQ = 128


@pytest.fixture(scope='module')
def sft_files(demo_data, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('sft'))
  demo_corpus.write_instruction_task(os.path.join(demo_data['dir'], 'data'), out, 400, 40)
  return {'train': os.path.join(out, 'train.jsonl'), 'eval': os.path.join(out, 'eval.jsonl')}


def test_demo_instruction_set_asks_every_question_of_each_training_sentence(demo_data, tmp_path):
  """scripts/demo.sh's instruction set: all three questions about each training sentence (the model
  must read the question to answer), one question per held-out sentence, every answer correct."""
  demo_corpus.write_instruction_task(os.path.join(demo_data['dir'], 'data'), str(tmp_path), 300, 40,
                                     train_questions_per_sentence=3)
  asked = {}
  for split in ('train', 'eval'):
    with open(tmp_path / f'{split}.jsonl') as f:
      records = [json.loads(line) for line in f]
    asked[split] = {}
    for r in records:
      user, answer = r['messages']
      question, sentence = user['content'].split('\n')
      assert (question, answer['content']) == (demo_corpus.QUESTIONS[r['task']][0],
                                               demo_corpus.QUESTIONS[r['task']][1](sentence.split()))
      asked[split].setdefault(sentence, []).append(r['task'])
    assert len(records) == {'train': 300, 'eval': 40}[split]
  assert all(sorted(set(tasks)) == sorted(demo_corpus.QUESTIONS) for tasks in asked['train'].values())
  assert len(asked['eval']) >= 39 and sorted(set(sum(asked['eval'].values(), []))) == sorted(demo_corpus.QUESTIONS)
  # In a shuffled order: not the three questions of one sentence after another.
  with open(tmp_path / 'train.jsonl') as f:
    firsts = [json.loads(line)['messages'][0]['content'].split('\n')[1] for line in f][:3]
  assert len(set(firsts)) > 1


def _config(demo_data, sft_files, **data):
  return run_config('sft_tiny', train=dict(seq_len=SEQ, eval_every=3),
                    data={**dict(train_files=sft_files['train'], eval_files=sft_files['eval'],
                                 tokenizer=demo_data['tokenizer']), **data},
                    optimizer=dict(decay_steps=6, warmup_steps=2, lr=3e-3), checkpoint=dict(every_steps=3))


def _write(path, lines):
  path.write_text(''.join(line + '\n' for line in lines))
  return str(path)


GOOD = json.dumps({'messages': [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}]})


@pytest.mark.parametrize('bad,error', [
    ('{"messages": [', 'bad.jsonl:2: malformed JSON'),
    ('{"conversation": []}', "bad.jsonl:2: missing field 'messages'"),
    ('{"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "x"}]}',
     'bad.jsonl:2: chat template llama2 .*: llama2: after an optional system message, user and assistant '
     'messages must alternate'),
    ('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]}',
     'bad.jsonl:2: message 1 must be an object with \'role\' and \'content\''),
    ('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}',
     'bad.jsonl:2: message 1 is an empty assistant answer'),
])
def test_bad_records_name_file_and_line(demo_data, sft_files, tmp_path, bad, error):
  path = _write(tmp_path / 'bad.jsonl', [GOOD, bad, GOOD])
  cfg = _config(demo_data, sft_files, train_files=path)
  with pytest.raises(BadRecord, match=error):
    SFTData(cfg.data, SEQ)
  cfg.data.skip_bad_records = True
  data = SFTData(cfg.data, SEQ)
  assert len(data.train_examples) == 2
  assert data.stats()['train_skipped_bad_records'] == 1


def test_examples_with_nothing_to_learn_are_counted(demo_data, sft_files, tmp_path):
  """A conversation without an assistant message gives an empty loss mask: counted and left out; when
  every mask is empty, the run stops and says so."""
  bot = json.dumps({'messages': [{'role': 'user', 'content': 'Hi'}, {'role': 'bot', 'content': 'Hello'}]})
  path = _write(tmp_path / 'roles.jsonl', [GOOD, bot, bot])
  data = SFTData(_config(demo_data, sft_files, train_files=path, eval_files='').data, SEQ)
  assert len(data.train_examples) == 1 and data.stats() == {'train_empty_mask': 2}
  path = _write(tmp_path / 'bots.jsonl', [bot, bot])
  with pytest.raises(BadRecord, match='the loss masks of all 2 are empty .chat template llama2; does any '
                     'message have the role "assistant"'):
    SFTData(_config(demo_data, sft_files, train_files=path, eval_files='').data, SEQ)


def test_overlong_examples_are_truncated_or_dropped_and_counted(demo_data, sft_files, tmp_path):
  long = json.dumps({'messages': [{'role': 'user', 'content': 'Hi'},
                                  {'role': 'assistant', 'content': 'word ' * 200}]})
  too_long_prompt = json.dumps({'messages': [{'role': 'user', 'content': 'word ' * 200},
                                             {'role': 'assistant', 'content': 'ok'}]})
  path = _write(tmp_path / 'long.jsonl', [GOOD, long, too_long_prompt])
  data = SFTData(_config(demo_data, sft_files, train_files=path, eval_files='').data, 64)
  assert data.stats() == {'train_truncated': 1, 'train_dropped_overlong_no_answer': 1}
  assert [len(e[0]) for e in data.train_examples][1] == 64
  data = SFTData(_config(demo_data, sft_files, train_files=path, eval_files='', overlong='drop').data, 64)
  assert data.stats() == {'train_dropped_overlong': 2} and len(data.train_examples) == 1


def test_alpaca_and_prompt_completion_formats(demo_data, sft_files, tmp_path):
  alpaca = tmp_path / 'alpaca.json'
  alpaca.write_text(json.dumps([{'instruction': 'Add', 'input': '2 and 3', 'output': '5'},
                                {'instruction': 'Say hi', 'output': 'hi'}]))
  data = SFTData(_config(demo_data, sft_files, train_files=str(alpaca), eval_files='', format='alpaca',
                         chat_template='alpaca').data, SEQ)
  tok = data.tokenizer
  ids, mask = data.train_examples[0]
  assert tok.decode([i for i, m in zip(ids, mask) if m]) == '5'
  assert 'Add\n\n2 and 3' in tok.decode(ids)
  pc = _write(tmp_path / 'pc.jsonl', [json.dumps({'q': 'Capital of France?', 'a': 'Paris'})])
  cfg = _config(demo_data, sft_files, train_files=pc, eval_files='', format='prompt_completion')
  cfg.data.fields.prompt, cfg.data.fields.completion = 'q', 'a'
  ids, mask = SFTData(cfg.data, SEQ).train_examples[0]
  assert tok.decode([i for i, m in zip(ids, mask) if m]) == 'Paris '  # llama2 trains " Paris </s>"


def _model_and_batch(demo_data, sft_files):
  data = SFTData(_config(demo_data, sft_files).data, SEQ)
  batch = next(data.train_iterator(0, 1, 8))
  model = Transformer(micro_model_config(max_seq_len=4096))
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  params = jax.tree.map(lambda x: x.value, params, is_leaf=lambda x: hasattr(x, 'value'))
  return model, params, batch


def test_sharegpt_and_other_role_names_reach_sft_preference_pairs_and_prompts(demo_data, sft_files, tmp_path):
  """ShareGPT records (conversations of from/value messages, roles human/gpt/system) give the examples
  that the same conversations as chat records give; config.data.roles renames other role names, for
  instruction tuning, preference pairs and GRPO prompts alike. A role left unknown is the template's
  error naming file and line, and conversations without an assistant say where roles are renamed."""
  from data import config as data_config, instructions, preference  # pylint: disable=import-outside-toplevel
  from data.prompts import PromptData  # pylint: disable=import-outside-toplevel
  with open(sft_files['train'], encoding='utf-8') as f:
    chats = [json.loads(line) for line in f][:24]
  chats[0]['messages'].insert(0, {'role': 'system', 'content': 'Answer in one word.'})
  sharegpt_names = {'system': 'system', 'user': 'human', 'assistant': 'gpt'}
  sharegpt = [{'conversations': [{'from': sharegpt_names[m['role']], 'value': m['content']}
                                 for m in r['messages']], 'task': r['task']} for r in chats]
  chat_path = _write(tmp_path / 'chat.jsonl', [json.dumps(r) for r in chats])
  sharegpt_path = _write(tmp_path / 'sharegpt.jsonl', [json.dumps(r) for r in sharegpt])
  expected = SFTData(_config(demo_data, sft_files, train_files=chat_path, eval_files=chat_path).data, SEQ)
  got = SFTData(_config(demo_data, sft_files, train_files=sharegpt_path, eval_files=sharegpt_path,
                        format='sharegpt').data, SEQ)
  assert len(got.train_examples) == len(chats)
  for (ids_a, mask_a), (ids_b, mask_b) in zip(expected.train_examples, got.train_examples):
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_array_equal(mask_a, mask_b)
  assert [m for _, m in got.eval_conversations] == [r['messages'] for r in chats]
  # Field names that config.data.fields sets win over sharegpt's; data.roles adds to its roles.
  renamed = [{'turns': [{'from': {'human': 'person', 'gpt': 'bot'}.get(m['from'], m['from']),
                         'value': m['value']} for m in r['conversations']]} for r in sharegpt]
  renamed_path = _write(tmp_path / 'renamed.jsonl', [json.dumps(r) for r in renamed])
  cfg = _config(demo_data, sft_files, train_files=renamed_path, eval_files='', format='sharegpt',
                roles='person=user, bot=assistant').data
  cfg.fields.messages = 'turns'
  got = SFTData(cfg, SEQ)
  assert [ids.tolist() for ids, _ in got.train_examples] == [ids.tolist() for ids, _ in expected.train_examples]
  # The same names in chat records ({"role", "content"}), for the formats that read messages.
  people = [{'messages': [{'role': {'user': 'person', 'assistant': 'bot'}.get(m['role'], m['role']),
                           'content': m['content']} for m in r['messages']]} for r in chats]
  people_path = _write(tmp_path / 'people.jsonl', [json.dumps(r) for r in people])
  cfg = _config(demo_data, sft_files, train_files=people_path, eval_files='', roles='person=user,bot=assistant')
  assert len(SFTData(cfg.data, SEQ).train_examples) == len(chats)
  cfg.data.roles = ''
  with pytest.raises(BadRecord, match='people.jsonl:1: chat template llama2 .*must alternate'):
    SFTData(cfg.data, SEQ)
  cfg.data.roles = 'person=user'
  with pytest.raises(BadRecord, match='the loss masks of all 24 are empty .*config.data.roles'):
    SFTData(cfg.data, SEQ)
  cfg.data.roles = 'person'
  with pytest.raises(ValueError, match='config.data.roles must be comma-separated NAME=ROLE pairs'):
    SFTData(cfg.data, SEQ)
  # Preference pairs: the prompt's and the completions' messages.
  fields = data_config.get_config().fields
  pair = {'prompt': [{'role': 'person', 'content': 'Hi'}], 'chosen': [{'role': 'bot', 'content': 'Hello'}],
          'rejected': [{'role': 'bot', 'content': 'Go'}]}
  prompt, chosen, rejected = preference.to_pair(pair, fields, {'person': 'user', 'bot': 'assistant'})
  assert (prompt[0]['role'], chosen[0]['role'], rejected[0]['role']) == ('user', 'assistant', 'assistant')
  # GRPO prompts: chat messages, renamed, with the record's columns.
  cfg = _config(demo_data, sft_files, train_files=sharegpt_path, eval_files='', format='sharegpt').data
  prompts = PromptData(cfg, 0).prompts
  assert prompts[1].prompt == chats[1]['messages'][:-1] and prompts[1].columns['task'] == chats[1]['task']
  assert prompts[1].columns['reference'] == chats[1]['messages'][-1]['content']
  assert instructions.role_map(cfg) == {'human': 'user', 'gpt': 'assistant'}


def test_generation_eval_warns_once_of_references_that_normalise_to_nothing(demo_data, sft_files, tmp_path,
                                                                             caplog):
  """Held-out answers such as "The" normalise to nothing under SQuAD's exact match and F1, which then
  count an empty answer as right: scoring them says so once, when the run starts, with the count."""
  import logging  # pylint: disable=import-outside-toplevel
  import types  # pylint: disable=import-outside-toplevel
  from model.lora import LoraConfig  # pylint: disable=import-outside-toplevel
  article = json.dumps({'messages': [{'role': 'user', 'content': 'Which word comes first?\nThe end'},
                                     {'role': 'assistant', 'content': 'The'}]})
  heldout = _write(tmp_path / 'heldout.jsonl', [GOOD, article, article])
  c = _config(demo_data, sft_files, eval_files=heldout)
  data = SFTData(c.data, SEQ)
  run = types.SimpleNamespace(model_config=micro_model_config(), mesh=None, lora=LoraConfig())
  for metrics, warned in (('exact_match,rougeL', True), ('exact_match_strict,rougeL', False)):
    c.eval.generation.metrics = metrics
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      evaluation.GenerationEval(c, run, data, str(tmp_path / 'run'), primary=True)
    warnings = [r.getMessage() for r in caplog.records if 'normalise to the empty string' in r.getMessage()]
    assert len(warnings) == warned, warnings
    if warned:
      assert warnings[0].startswith('2 of 3 references of the 3 held-out conversations')


def test_prompt_targets_carry_no_gradient(demo_data, sft_files):
  model, params, batch = _model_and_batch(demo_data, sft_files)
  weights = batch['loss_weights']
  assert 0 < weights.sum() < (batch['segment_ids'] > 0).sum()  # some tokens trained, not all

  @jax.jit
  def loss_and_grads(b):
    f = lambda p: (lambda s: s['ce'] / s['weight'])(step_lib.loss_sums(model, p, b))
    return jax.value_and_grad(f)(params)

  base_loss, base_grads = loss_and_grads(batch)
  prompt_only = {**batch, 'targets': np.where(weights == 0, (batch['targets'] + 17) % 512, batch['targets'])}
  loss, grads = loss_and_grads(prompt_only)
  assert float(loss) == float(base_loss)
  for a, b in zip(jax.tree.leaves(base_grads), jax.tree.leaves(grads)):
    np.testing.assert_array_equal(a, b)
  answer = {**batch, 'targets': np.where(weights > 0, (batch['targets'] + 17) % 512, batch['targets'])}
  assert abs(float(loss_and_grads(answer)[0]) - float(base_loss)) > 1e-3


def test_packed_examples_do_not_see_each_other(demo_data, sft_files):
  model, params, batch = _model_and_batch(demo_data, sft_files)
  row = int(np.argmax(batch['segment_ids'].max(axis=1)))
  segments = batch['segment_ids'][row]
  assert segments.max() >= 2  # several examples share the row
  apply = jax.jit(model.apply)
  packed = apply({'params': params}, batch['inputs'][row:row + 1], segments[None],
                 batch['positions'][row:row + 1])[0]
  for seg in sorted({2, int(segments.max())}):
    where = segments == seg
    assert batch['positions'][row][where][0] == 0
    alone = apply({'params': params}, batch['inputs'][row][where][None])[0]
    np.testing.assert_allclose(packed[where], alone, atol=1e-5)


@pytest.fixture(scope='module')
def pretrained(micro_checkpoint):
  """A short pretraining run of the micro model to start instruction tuning from."""
  return micro_checkpoint


@pytest.mark.slow
@pytest.mark.e2e
def test_sft_from_checkpoint_resumes_exactly(demo_data, sft_files, pretrained, tmp_path):
  def sft(workdir, steps):
    c = _config(demo_data, sft_files)
    c.train.steps = steps
    c.init_from = pretrained
    return loop.train(c, workdir, SFTData(c.data, SEQ))

  straight, interrupted = str(tmp_path / 'straight'), str(tmp_path / 'interrupted')
  sft(straight, 6)
  sft(interrupted, 4)
  sft(interrupted, 6)
  a, b = _losses(straight), _losses(interrupted)
  assert sorted(a) == sorted(b) == list(range(1, 7))
  np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-6)
  # Held-out loss on answer tokens, every eval_every steps and at the end, in a JSON file.
  with open(os.path.join(straight, 'eval_results.json')) as f:
    evals = json.load(f)
  assert [e['step'] for e in evals] == [3, 6] and all(e['eval_perplexity'] > 1 for e in evals)
  with open(os.path.join(interrupted, 'eval_results.json')) as f:
    assert [e['step'] for e in json.load(f)] == [3, 4, 6]
  # Starting parameters are the pretraining run's, not a random init.
  run = run_lib.Run(_config(demo_data, sft_files))
  start = params_lib.load_params(pretrained, run.abstract_state().params)
  fresh = start_lib.load_init_from(run, pretrained).state.params
  for x, y in zip(jax.tree.leaves(start), jax.tree.leaves(fresh)):
    np.testing.assert_array_equal(x, y)


def test_init_from_a_different_model_is_an_error(demo_data, sft_files, pretrained):
  other = _config(demo_data, sft_files)
  other.model.mlp_dim = 256
  with pytest.raises(validate.ConfigError, match=r'model.mlp_dim: checkpoint 128, config 256'):
    start_lib.load_init_from(run_lib.Run(other), pretrained)


def test_the_model_comes_from_init_from_unless_the_config_sets_its_shape(pretrained):
  """A fine-tuning config that leaves its preset's architecture as it is (sft_tiny: 'tiny') trains the
  init_from checkpoint's model (here the micro model), computed as the config says; model.preset=init_from
  does so whatever the config's architecture fields hold."""
  saved = params_lib.load_model_config(pretrained)
  assert saved.embed_dim != ModelConfig.from_dict(sft_tiny.get_config().model).embed_dim  # a real test
  c = sft_tiny.get_config()
  c.init_from = pretrained
  c.model.update(dict(remat_policy='full', dtype='bfloat16', attention='xla'))
  run = run_lib.Run(c)
  assert run.model_config == dataclasses.replace(saved, remat_policy='full', dtype='bfloat16',
                                                 attention='xla', scan_layers=False)
  params = start_lib.load_init_from(run, pretrained).state.params
  assert params['token_embed'].shape == (saved.vocab_size, saved.embed_dim)
  c.model.n_layers = 3  # set on purpose: checked against the checkpoint, as before
  with pytest.raises(validate.ConfigError, match='model.n_layers: checkpoint 2, config 3'):
    start_lib.load_init_from(run_lib.Run(c), pretrained)
  c.model.preset = 'init_from'
  assert run_lib.Run(c).model_config.n_layers == 2
  c.init_from = ''
  with pytest.raises(validate.ConfigError, match="model.preset='init_from' .* config.init_from, which is empty"):
    run_lib.Run(c)


# ---------------------------------------------------------------------------------------------------
# Evaluation during tuning: task metrics of generated answers, early stopping, the best checkpoint

def test_early_stopping_counts_evaluations_without_a_new_best(demo_data, sft_files):
  def stops(values, **settings):
    c = _config(demo_data, sft_files)
    c.train.early_stopping.update(dict(metric='eval_f1', **settings))
    watch = evaluation.EarlyStopping(c, ['eval_loss', 'eval_f1'])
    bests = [watch.update(10 * i, {'eval_f1': v}) for i, v in enumerate(values)]
    return watch.stopped_at, watch.best_step, bests

  c = _config(demo_data, sft_files)
  c.train.early_stopping.metric = 'eval_loss'
  assert evaluation.EarlyStopping(c, ['eval_loss']).mode == 'min'  # losses are better lower
  # Step 0 is a baseline, not a candidate; task metrics are better higher.
  assert stops([99, 1, 2, 2, 1.5, 3], patience=2) == (40, 20, [False, True, True, False, False, False])
  assert stops([1, 2, 2.05, 2.1, 5], patience=2, min_delta=0.2) == (30, 10, [False, True, False, False, False])
  assert stops([0, 5, 4, 3, 2, 1], patience=0) == (None, 10, [False, True] + [False] * 4)
  assert stops([0, 5, 4, 3], patience=3, mode='min') == (None, 30, [False, True, True, True])
  c = _config(demo_data, sft_files)
  c.train.early_stopping.metric = 'eval_rougeL'
  with pytest.raises(validate.ConfigError, match="'eval_rougeL', which this run does not evaluate"):
    evaluation.EarlyStopping(c, ['eval_loss', 'eval_perplexity'])


def _stopping_config(demo_data, sft_files, pretrained, steps, **generation):
  c = _config(demo_data, sft_files)
  c.init_from = pretrained
  c.train.update(dict(steps=steps, eval_every=2))
  c.optimizer.decay_steps = 10  # the same schedule whatever train.steps, so that runs can be resumed
  c.checkpoint.update(dict(every_steps=3, keep=1))  # the best, step 2, is saved off this schedule
  # No evaluation after the first beats it by 1e9: the run must keep step 2 and stop at the second
  # evaluation after it, step 6, whatever the losses.
  c.train.early_stopping.update(dict(metric='eval_loss', patience=2, min_delta=1e9))
  c.eval.generation.update(generation)
  return c


def _sft_run(config, workdir):
  return loop.train(config, workdir, SFTData(config.data, SEQ))


def _read(workdir, name):
  with open(os.path.join(workdir, name), encoding='utf-8') as f:
    return json.load(f) if name.endswith('.json') else [json.loads(line) for line in f]


@pytest.mark.slow
@pytest.mark.e2e
def test_early_stopping_keeps_the_best_checkpoint_also_across_a_resume(demo_data, sft_files, pretrained,
                                                                      tmp_path):
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  _sft_run(_stopping_config(demo_data, sft_files, pretrained, 10, metrics='exact_match,rougeL',
                            num_prompts=4, max_new_tokens=4, batch_size=4), straight)
  _sft_run(_stopping_config(demo_data, sft_files, pretrained, 4), resumed)  # evaluates at 2 and 4
  assert 'stopped_early_at' not in _read(resumed, 'final_metrics.json')
  _sft_run(_stopping_config(demo_data, sft_files, pretrained, 10), resumed)  # remembers 2 and 4
  for workdir in (straight, resumed):
    final = _read(workdir, 'final_metrics.json')
    assert (final['step'], final['stopped_early_at'], final['best_step']) == (6, 6, 2)
    assert final['best_checkpoint'] == os.path.join(workdir, 'checkpoints', '2')
    # checkpoint.keep = 1 keeps the last step; the best is kept besides it.
    assert params_lib.saved_steps(os.path.join(workdir, 'checkpoints')) == [2, 6]
    assert _read(workdir, params_lib.BEST_RECORD)['step'] == 2
    assert str(params_lib.resolve_step_dir(f'{workdir}:best')) == final['best_checkpoint']
    assert [e['step'] for e in _read(workdir, 'eval_results.json')] == [2, 4, 6]
  a, b = _losses(straight), _losses(resumed)
  assert sorted(a) == sorted(b) == list(range(1, 7))  # no step after the stop
  np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-6)
  # A rerun of the stopped run trains no further.
  _sft_run(_stopping_config(demo_data, sft_files, pretrained, 10), resumed)
  assert sorted(_losses(resumed)) == list(range(1, 7))
  with pytest.raises(FileNotFoundError, match='best_checkpoint.json not found'):
    params_lib.resolve_step_dir(f'{pretrained}:best')

  # The task metrics of each evaluation: in eval_results.json, metrics.jsonl, TensorBoard and a
  # samples file of the answers.
  evals = _read(straight, 'eval_results.json')
  assert all(0 <= e['eval_exact_match'] <= 100 and 0 <= e['eval_rougeL'] <= 100 for e in evals)
  logged = [r for r in _read(straight, 'metrics.jsonl') if 'eval_exact_match' in r]
  assert [r['step'] for r in logged] == [2, 4, 6]
  [events] = glob.glob(os.path.join(straight, 'tensorboard', 'events.*'))
  with open(events, 'rb') as f:
    assert b'eval_rougeL' in f.read()
  for step, entry in zip((2, 4, 6), evals):
    samples = _read(straight, f'generation_samples/{step}.jsonl')
    assert len(samples) == 4 and set(samples[0]) == {'where', 'prompt', 'reference', 'answer',
                                                     'exact_match', 'rougeL'}
    assert np.mean([s['rougeL'] for s in samples]) == pytest.approx(entry['eval_rougeL'])
    assert samples[0]['where'].endswith('eval.jsonl:1') and samples[0]['prompt'].startswith('What is')

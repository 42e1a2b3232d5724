"""lm-evaluation-harness in process (model/evaluation/harness.py) against the harness's own Hugging Face backend,
and `python -m model.evaluate` as a user runs it.

A tiny random Llama is built with torch (float32, CPU) and imported; both lm-eval backends run the
same local tasks of all three request types (multiple choice, perplexity windows longer than the
model's 256 positions, generation from prompts of different lengths with stop sequences, in batches),
also with a chat template and few-shot turns, and must give the same per-request log-likelihoods,
greedy flags, generations, accuracy and perplexity.
"""

import glob
import json
import os

import numpy as np
import pytest
from pydoc_data import topics

torch = pytest.importorskip('torch', reason='torch is not installed (the newest-releases CI set has no '
                            'CPU build of it)')
transformers = pytest.importorskip('transformers', reason='transformers is not installed')

import lm_eval  # pylint: disable=wrong-import-position
from lm_eval.models.huggingface import HFLM  # pylint: disable=wrong-import-position
from lm_eval.tasks import TaskManager  # pylint: disable=wrong-import-position

from data import chat  # pylint: disable=wrong-import-position
from data.tokenizer import load_tokenizer
from model import convert
from model.evaluation import task_metrics
from model.evaluation.harness import FlaxLM
from model.generate import load_model
from tests.cli import ROOT, run_cli
from tests.tokenizers_for_tests import make_hf_tokenizer

pytestmark = [pytest.mark.parity, pytest.mark.e2e]

TASKS = ('t_mc', 't_ppl', 't_gen')
OFFLINE = {'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1'}


def _task_files(folder) -> str:
  """Local tasks of the three request types, their data beside them (absolute paths)."""
  folder.mkdir()
  rng = np.random.default_rng(0)
  colours = ['red', 'green', 'blue', 'yellow', 'black', 'white']
  mc = [{'question': f'Item {i} is painted which colour?', 'choices': list(rng.permutation(colours)[:4]),
         'label': i % 4} for i in range(8)]
  texts = list(topics.topics.values())[40:46]
  ppl = [{'text': t[:n]} for t, n in zip(texts, (60, 400, 900, 1500, 80, 2000))]  # up to 3 windows
  gen = [{'question': f'What is {i} plus {i}?' + ' Think of the sum.' * (i % 3), 'answer': str(2 * i)}
         for i in range(6)]
  common = {'test_split': 'test', 'fewshot_split': 'test', 'metadata': {'version': 1.0}}
  specs = {
      't_mc': (mc, {'output_type': 'multiple_choice', 'doc_to_text': 'Question: {{question}}\nAnswer:',
                    'doc_to_choice': '{{choices}}', 'doc_to_target': 'label',
                    'metric_list': [{'metric': 'acc'}, {'metric': 'acc_norm'}]}),
      't_ppl': (ppl, {'output_type': 'loglikelihood_rolling', 'doc_to_text': '', 'doc_to_target': '{{text}}',
                      'metric_list': [{'metric': m} for m in ('word_perplexity', 'byte_perplexity',
                                                              'bits_per_byte')]}),
      't_gen': (gen, {'output_type': 'generate_until', 'doc_to_text': 'Q: {{question}}\nA:',
                      'doc_to_target': '{{answer}}',
                      'generation_kwargs': {'until': ['\n', 'Q:'], 'max_gen_toks': 16, 'do_sample': False},
                      'metric_list': [{'metric': 'exact_match'}]}),
  }
  for name, (rows, spec) in specs.items():
    data = folder / f'{name}.jsonl'
    data.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    config = {'task': name, 'dataset_path': 'json', 'dataset_kwargs': {'data_files': {'test': str(data)}},
              **common, **spec}
    (folder / f'{name}.yaml').write_text(json.dumps(config))  # JSON is YAML
  return str(folder)


@pytest.fixture(scope='module')
def models(tmp_path_factory):
  """(HF folder, flaxlm checkpoint, task folder, TaskManager): a random Llama with a Llama 3 style
  tokenizer and chat template, and its import."""
  root = tmp_path_factory.mktemp('harness')
  hf_dir = root / 'hf'
  make_hf_tokenizer(hf_dir, vocab_size=400)
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  with open(chat.TEMPLATE_DIR + '/llama3.jinja', encoding='utf-8') as f:
    tokenizer.chat_template = f.read()
  tokenizer.save_pretrained(hf_dir)
  config = transformers.LlamaConfig(
      vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(config)
  torch.manual_seed(0)
  with torch.no_grad():  # as tests/test_convert.py: clear greedy winners, every weight random
    for name, p in model.named_parameters():
      p.copy_(1 + 0.1 * torch.randn_like(p) if 'norm' in name else 0.1 * torch.randn_like(p))
  model.save_pretrained(hf_dir)
  ckpt = str(root / 'ckpt')
  convert.import_hf(str(hf_dir), ckpt, log=None)
  tasks = _task_files(root / 'tasks')
  return str(hf_dir), ckpt, tasks, TaskManager(include_path=tasks)


def _flax_lm(models, template=None, batch_size=4):
  hf_dir, ckpt, _, _ = models
  cfg, lora, params = load_model(ckpt, 'float32')
  tokenizer = load_tokenizer(hf_dir)
  if template:
    template = chat.load_template(template, tokenizer)
  return FlaxLM(cfg, params, tokenizer, template, batch_size=batch_size, lora=lora)


def _evaluate(lm, models, tasks, chat_template=False, num_fewshot=None):
  return lm_eval.simple_evaluate(model=lm, model_args={'pretrained': models[1]}, tasks=list(tasks),
                                 task_manager=models[3], log_samples=True, bootstrap_iters=0,
                                 apply_chat_template=chat_template, fewshot_as_multiturn=chat_template,
                                 num_fewshot=num_fewshot)


def _compare(hf, ours, tasks):
  """Every response and metric of two harness runs, equal to float32 precision."""
  for task in tasks:
    hf_samples, our_samples = hf['samples'][task], ours['samples'][task]
    assert [s['doc_id'] for s in hf_samples] == [s['doc_id'] for s in our_samples]
    for a, b in zip(hf_samples, our_samples):
      assert a['arguments'] == b['arguments']  # the same prompts (chat rendering included)
      for (ra,), (rb,) in zip(a['resps'], b['resps']):
        if isinstance(ra, str):
          assert ra == rb, (task, a['doc_id'])
        elif isinstance(ra, tuple):  # (log-likelihood, is_greedy)
          assert abs(ra[0] - rb[0]) < 1e-4 and ra[1] == rb[1], (task, a['doc_id'], ra, rb)
        else:  # a document's rolling log-likelihood: a float32 sum over up to 3 windows (about -5,000)
          assert abs(ra - rb) < 1e-4 + 1e-6 * abs(ra), (task, a['doc_id'], ra, rb)
    for metric, value in hf['results'][task].items():
      if isinstance(value, float):
        np.testing.assert_allclose(ours['results'][task][metric], value, rtol=1e-4, err_msg=metric)


@pytest.fixture(scope='module')
def hf_runs(models):
  hf = HFLM(pretrained=models[0], dtype='float32', device='cpu', batch_size=4)
  plain = _evaluate(hf, models, TASKS)
  # Generation stops at EOS, and in chats also at the end of turn, as flaxlm stops with a template.
  hf.model.generation_config.eos_token_id = [hf.tokenizer.eos_token_id,
                                             hf.tokenizer.convert_tokens_to_ids('<|eot_id|>')]
  return plain, _evaluate(hf, models, ('t_mc', 't_gen'), True, 2)


def test_same_results_as_lm_evals_hf_backend(models, hf_runs):
  hf, _ = hf_runs
  ours = _evaluate(_flax_lm(models), models, TASKS)
  _compare(hf, ours, TASKS)
  # The comparison has teeth: windows longer than the model, greedy continuations, cut generations.
  rolling = hf['samples']['t_ppl']
  assert max(len(s['doc']['text']) for s in rolling) > 3 * 256
  generations = [s['resps'][0][0] for s in hf['samples']['t_gen']]
  assert all(generations) and len(set(generations)) > 1
  assert ours['config']['model_num_parameters'] == 125_248 and ours['eot_token_id'] == hf['eot_token_id']


def test_same_results_with_a_chat_template_and_few_shot_turns(models, hf_runs):
  _, hf = hf_runs
  lm = _flax_lm(models, 'llama3')
  ours = _evaluate(lm, models, ('t_mc', 't_gen'), True, 2)
  _compare(hf, ours, ('t_mc', 't_gen'))
  context = ours['samples']['t_gen'][0]['arguments'][0][0]
  assert context.startswith('<|begin_of_text|><|start_header_id|>user') and context.count('<|eot_id|>') == 5
  # What the harness logs (and hashes) as the template is the template transformers applied.
  assert lm.chat_template(True) == transformers.AutoTokenizer.from_pretrained(models[0]).chat_template


def test_a_lora_checkpoint_gives_what_peft_gives_in_the_hf_backend(models, tmp_path):
  """A PEFT adapter (A and B random) imported as a LoRA checkpoint runs unmerged over its base and
  scores as lm-eval's hf backend scores the base with the adapter (`peft=`)."""
  peft = pytest.importorskip('peft')
  hf_dir, ckpt, _, _ = models
  torch.manual_seed(1)
  base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=16, target_modules=['q_proj', 'v_proj', 'down_proj'],
                                            init_lora_weights=False, task_type='CAUSAL_LM')).save_pretrained(
                                                tmp_path / 'adapter')
  convert.import_peft(str(tmp_path / 'adapter'), ckpt, str(tmp_path / 'lora'), log=None)
  tasks = ('t_mc', 't_ppl')
  hf = _evaluate(HFLM(pretrained=hf_dir, peft=str(tmp_path / 'adapter'), dtype='float32', device='cpu',
                      batch_size=4), models, tasks)
  cfg, lora, params = load_model(str(tmp_path / 'lora'), 'float32')
  assert lora.rank == 4
  ours = _evaluate(FlaxLM(cfg, params, load_tokenizer(hf_dir), batch_size=4, lora=lora), models, tasks)
  _compare(hf, ours, tasks)
  plain = _evaluate(_flax_lm(models), models, ('t_ppl',))  # the adapter changes the numbers
  assert abs(plain['samples']['t_ppl'][0]['resps'][0][0] - ours['samples']['t_ppl'][0]['resps'][0][0]) > 0.1


def test_generate_until_stops_at_sequences_and_batches_any_prompt_lengths(models):
  """A stop sequence cuts the text before it, and prompts of different lengths in one batch get what
  each gets alone."""
  from lm_eval.api.instance import Instance  # pylint: disable=import-outside-toplevel
  lm = _flax_lm(models, batch_size=3)
  contexts = ['A for statement', 'The while loop runs', 'x = 1\ny = 2\n' * 5]  # 3, 5 and 45 tokens

  def generate(lm, stops):
    requests = [Instance('generate_until', {}, (c, {'until': stops, 'max_gen_toks': 24}), i)
                for i, c in enumerate(contexts)]
    return lm.generate_until(requests)

  free = generate(lm, [])
  assert all(len(text) > 10 for text in free)
  assert generate(_flax_lm(models, batch_size=1), []) == free
  stop = free[2][len(free[2]) // 3:len(free[2]) // 3 + 2]  # two characters from inside an answer
  cut = generate(lm, [stop])
  for text, full in zip(cut, free):
    assert stop not in text and full.startswith(text)
    assert text == full.split(stop)[0]
  assert cut[2] != free[2]


def test_cli_writes_what_lm_evals_cli_writes(models, hf_runs, tmp_path):
  """The shipped local tasks offline: lm-eval's table on stdout, its results and samples files."""
  hf_dir, ckpt, _, _ = models
  out = tmp_path / 'out'
  proc = run_cli('model.evaluate', '--ckpt', ckpt, '--tokenizer', hf_dir, '--dtype', 'float32',
                 '--include_path', os.path.join(ROOT, 'data', 'eval_tasks'),
                 '--tasks', 'flaxlm_words,flaxlm_docs', '--limit', '6', '--batch_size', '4',
                 '--bootstrap_iters', '0', '--output_path', out, '--log_samples', '--mesh', '1,-1,1',
                 **OFFLINE)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '|flaxlm_words|' in proc.stdout and 'byte_perplexity' in proc.stdout
  assert f'flaxlm (pretrained={ckpt},tokenizer={hf_dir},dtype=float32,mesh=1,-1,1)' in proc.stdout
  [folder] = glob.glob(str(out / '*'))
  assert os.path.basename(folder) == ckpt.replace('/', '__')
  [results] = glob.glob(f'{folder}/results_*.json')
  date = results.split('results_')[1][:-len('.json')]
  assert sorted(os.listdir(folder)) == sorted([os.path.basename(results)] + [
      f'samples_{t}_{date}.jsonl' for t in ('flaxlm_words', 'flaxlm_docs')])
  with open(results, encoding='utf-8') as f:
    written = json.load(f)
  hf = hf_runs[0]
  assert set(hf) - {'samples'} <= set(written)  # every key lm-eval's hf run has
  assert written['n-samples']['flaxlm_words'] == {'original': 60, 'effective': 6}
  assert 0 <= written['results']['flaxlm_words']['acc,none'] <= 1
  with open(f'{folder}/samples_flaxlm_docs_{date}.jsonl', encoding='utf-8') as f:
    lines = [json.loads(line) for line in f]
  assert len(lines) == 6 and set(lines[0]) >= {'doc_id', 'doc', 'arguments', 'resps', 'filtered_resps',
                                               'doc_hash', 'prompt_hash', 'word_perplexity'}


def test_cli_errors_in_one_line(models, tmp_path):
  hf_dir, ckpt, _, _ = models
  proc = run_cli('model.evaluate', '--ckpt', ckpt, '--tokenizer', hf_dir, '--tasks', 'lambada_openai',
                 **OFFLINE)
  assert proc.returncode != 0
  message = proc.stderr.strip().splitlines()[-1]
  assert message.startswith('a task needs to download its data, and this machine is offline')
  assert 'lambada_openai' in message
  proc = run_cli('model.evaluate', '--ckpt', ckpt, '--tokenizer', hf_dir, '--tasks', 't_mc',
                 '--log_samples', **OFFLINE)
  assert proc.returncode != 0 and 'Specify --output_path' in proc.stderr


def test_generate_metrics_scores_answers_to_any_sft_format(models, tmp_path):
  hf_dir, ckpt, _, _ = models
  data = tmp_path / 'heldout.jsonl'
  rows = [{'q': f'What is {i} plus {i}?', 'a': str(2 * i), 'task': 'sum' if i % 2 else 'double'}
          for i in range(5)]
  data.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  answers, scores = tmp_path / 'answers.jsonl', tmp_path / 'scores.json'
  proc = run_cli('model.evaluate', 'generate-metrics', '--ckpt', ckpt, '--tokenizer', hf_dir, '--data', data,
                 '--format', 'prompt_completion', '--fields', '{"prompt": "q", "completion": "a"}',
                 '--chat_template', 'llama3', '--max_new_tokens', '6', '--batch_size', '2',
                 '--output', answers, '--json_out', scores, '--label', 'Tiny: ')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Tiny: 5 held-out answers: exact_match ' in proc.stdout and '| chrf ' in proc.stdout
  with open(answers, encoding='utf-8') as f:
    lines = [json.loads(line) for line in f]
  with open(scores, encoding='utf-8') as f:
    written = json.load(f)
  assert [line['reference'] for line in lines] == [r['a'] for r in rows]
  assert lines[1]['task'] == 'sum' and lines[1]['prompt'] == 'What is 1 plus 1?'
  assert lines[0]['where'] == f'{data}:1' and isinstance(lines[0]['answer'], str)
  corpus, _ = task_metrics.score([line['answer'] for line in lines], [r['a'] for r in rows])
  assert written['metrics'] == pytest.approx(corpus) and written['examples'] == 5
  assert sorted(written['per_task']) == ['double', 'sum']
  # A record without the answer to score is an error naming it.
  data.write_text(json.dumps({'messages': [{'role': 'user', 'content': 'Hi'}]}) + '\n')
  proc = run_cli('model.evaluate', 'generate-metrics', '--ckpt', ckpt, '--tokenizer', hf_dir, '--data', data)
  assert proc.returncode != 0
  assert f'{data}:1: a held-out conversation must end with the assistant answer' in proc.stderr


def test_generate_metrics_gives_the_same_report_from_jsonl_and_parquet(models, tmp_path):
  """The same ShareGPT records as JSONL and as Parquet (pyarrow): the same printed report, per-task
  scores and answers file, each answer's `task` included; the references that SQuAD's normalisation
  empties ("The") are counted in one warning."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  hf_dir, ckpt, _, _ = models
  rows = [{'conversations': [{'from': 'human', 'value': f'What is {i} plus {i}?'},
                             {'from': 'gpt', 'value': 'The' if i == 3 else str(2 * i)}],
           'task': 'sum' if i % 2 else 'double'} for i in range(5)]
  jsonl, parquet = tmp_path / 'heldout.jsonl', tmp_path / 'heldout.parquet'
  jsonl.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  pq.write_table(pa.Table.from_pylist(rows), str(parquet), row_group_size=2)
  reports = []
  for data in (jsonl, parquet):
    answers, scores = tmp_path / f'{data.name}.answers.jsonl', tmp_path / f'{data.name}.scores.json'
    proc = run_cli('model.evaluate', 'generate-metrics', '--ckpt', ckpt, '--tokenizer', hf_dir, '--data', data,
                   '--format', 'sharegpt', '--chat_template', 'llama3', '--max_new_tokens', '4',
                   '--batch_size', '4', '--metrics', 'exact_match,exact_match_strict,f1', '--output', answers,
                   '--json_out', scores)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count('normalise to the empty string') == 1, proc.stderr[-3000:]
    assert f'1 of 5 references of the 5 records of {data} normalise to the empty string' in proc.stderr
    with open(answers, encoding='utf-8') as f:
      lines = [json.loads(line) for line in f]
    with open(scores, encoding='utf-8') as f:
      written = json.load(f)
    assert [line['task'] for line in lines] == [r['task'] for r in rows]
    assert sorted(written['per_task']) == ['double', 'sum']
    assert list(written['metrics']) == ['exact_match', 'exact_match_strict', 'f1']
    reports.append((proc.stdout, [{k: v for k, v in line.items() if k != 'where'} for line in lines], written))
  assert reports[0] == reports[1]

"""`python -m model.convert`: Hugging Face model folders <-> our checkpoints (Llama, Mistral, Qwen2,
Qwen3), and a check that both compute the same logits.

  python -m model.convert import --hf-dir Meta-Llama-3-8B --out ckpt/llama3_8b [--tokenizer DIR]
  python -m model.convert export --ckpt runs/sft --out hf/my-model [--tokenizer DIR] [--arch llama] \
      [--chat-template llama3]
  python -m model.convert export-peft --ckpt runs/lora --out hf/my-adapter [--base-name NAME]
  python -m model.convert import-peft --adapter-dir hf/my-adapter --base ckpt/llama3_8b --out ckpt/mine
  python -m model.convert check --hf-dir Meta-Llama-3-8B [--ckpt ckpt/llama3_8b] [--prompt TEXT ...]

`import` reads `config.json` and the (sharded) safetensors, derives a ModelConfig (saying which preset it
matches), and writes `<out>/checkpoints/0/{state,model_config}`: the layout our trainers write, so that
`--config.init_from=<out>` and `python -m model.generate --ckpt <out>` read it. Peak memory stays near
one copy of the weights in the stored dtype (model/weights/hf.py; docs/huggingface.md has the measured figure).

`export` is the inverse: safetensors (sharded past --shard-size-gb) plus `config.json` and
`generation_config.json`, which `transformers` (and vLLM) load as the same architecture, and the
tokenizer's files; a LoRA run's adapters are merged into the base weights they were trained on.
`export-peft` writes a LoRA run's adapters as a PEFT adapter folder, which `peft` loads onto the
exported base model (`PeftModel.from_pretrained(model, DIR)`); `import-peft` reads one onto a base
checkpoint, as a LoRA checkpoint (adapters + a reference to the base) that trainers (`init_from`),
`model.generate` and `model.evaluate` take. No TensorFlow and no torch are imported.

`check` runs our model (the checkpoint given, or the folder imported in memory) and, where torch and
transformers are installed, the original on the same prompts, and prints per position the largest
logit difference, the KL divergence of our next-token distribution from the original's, and whether
the likeliest tokens agree (as MaxText's forward_pass_logit_checker does); it exits with status 1
past the tolerances, 2 when there is no reference to compare with.
"""

import dataclasses
import json
import os
import shutil
import sys
from typing import Sequence

import jax
import numpy as np
from absl import app, flags

from data import chat
from data.tokenizer import check_vocab, load_tokenizer
from model.config import ARCHITECTURE_FIELDS, DTYPES, ModelConfig
from model.config import compute_dtype
from model.lora import LoraConfig
from model.transformer import Transformer
from model.weights import adapters, hf, params, peft
import runtime

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'tokenizer.model')


def import_hf(hf_dir: str, out: str, dtype: str | None = None, tokenizer: str | None = None,
              log=print, **overrides) -> ModelConfig:
  """Converts a HF model folder into `<out>/checkpoints/0`; returns the ModelConfig written."""
  log = log or hf.silent
  if dtype is not None:
    overrides['param_dtype'] = dtype
  cfg, arch, notes = hf.read_config(hf_dir, **overrides)
  for note in notes:
    log(f'NOTE: {note}')
  name, diff = hf.matching_preset(cfg)
  log(f'{hf.ARCH_CLASSES[arch]}: ' + (f'matches preset {name!r}' if name else diff))
  if tokenizer:
    check_vocab(load_tokenizer(tokenizer), cfg.vocab_size)
  out_dir = os.path.join(out, 'checkpoints')
  if os.path.exists(os.path.join(out_dir, '0')):
    raise FileExistsError(f'{out_dir}/0 exists already; choose a new --out')
  weights = hf.load_hf_params(hf_dir, cfg, DTYPES[cfg.param_dtype], log)
  if not cfg.scan_layers:
    weights = hf.unstack_layers(weights, cfg.n_layers)
  params.save_params(out_dir, cfg, weights)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(weights))
  log(f'Wrote {out_dir}/0 ({runtime.format_size(nbytes)} of {cfg.param_dtype} parameters)')
  return cfg


def export_hf(ckpt: str, out: str, arch: str | None = None, dtype: str = 'bfloat16',
              tokenizer: str | None = None, shard_size: int = 5 * 2**30, chat_template: str = '',
              template_name: str = '', template_variables: dict | None = None, log=print) -> dict:
  """Writes `out/` that `transformers.AutoModelForCausalLM.from_pretrained(out)` loads. Returns the
  config.json written. With `chat_template` (data/chat.py `load_template`; needs `tokenizer`), the
  template goes into tokenizer_config.json and generation_config.json stops at its end-of-turn tokens
  too, as transformers (apply_chat_template, generate) and vLLM read them."""
  log = log or hf.silent
  cfg = params.load_model_config(ckpt)
  arch = arch or hf.default_arch(cfg)
  if dtype not in DTYPES:
    raise ValueError(f'--dtype must be one of {sorted(DTYPES)}, got {dtype!r}')
  bos = eos = None
  if tokenizer:
    tok = load_tokenizer(tokenizer)
    check_vocab(tok, cfg.vocab_size)
    bos, eos = tok.bos_id, tok.eos_id
  stop_ids = [eos] if eos is not None else []
  template = None
  if chat_template:
    if not tokenizer:
      raise ValueError('--chat-template needs --tokenizer (to look up its end-of-turn tokens)')
    template = chat.load_template(chat_template, tok, template_name, template_variables)
    stop_ids = list(dict.fromkeys(template.stop_ids + stop_ids))
  hf_config = hf.config_to_hf(cfg, arch, dtype, bos, eos)
  os.makedirs(out, exist_ok=True)
  _, weights = adapters.load_merged_numpy(ckpt, dtype)  # LoRA: merged into the base
  hf.write_weights(out, hf.hf_tensors(weights, cfg, DTYPES[dtype]), shard_size, log)
  hf.write_json(os.path.join(out, 'config.json'), hf_config)
  generation = {'bos_token_id': bos, 'eos_token_id': stop_ids[0] if len(stop_ids) == 1 else (stop_ids or None)}
  hf.write_json(os.path.join(out, 'generation_config.json'),
                {k: v for k, v in generation.items() if v is not None})
  if tokenizer:
    _copy_tokenizer(tokenizer, out, log)
  if template:
    write_chat_template(out, template, log)
  log(f'Wrote {out}: {hf.ARCH_CLASSES[arch]}, {dtype}')
  return hf_config


def export_peft(ckpt: str, out: str, base_name: str = '', log=print) -> dict:
  """Writes the LoRA adapters of `ckpt` as a PEFT adapter folder; returns its adapter_config.json."""
  log = log or hf.silent
  ref = params.load_base_pointer(ckpt)
  if ref is None:
    raise ValueError(f'{ckpt} holds no LoRA adapters (config.lora.rank was 0): use `export`')
  cfg = params.load_model_config(ckpt)
  lora = LoraConfig.from_dict(ref['config'])
  peft.write(out, adapters.load_adapters_numpy(ckpt, cfg, lora), cfg, lora, base_name or ref['base'])
  log(f'Wrote {out}: LoRA rank {lora.rank} adapters (PEFT format) for the base model {ref["base"]}')
  with open(os.path.join(out, peft.CONFIG)) as f:
    return json.load(f)


def import_peft(adapter_dir: str, base: str, out: str, log=print) -> LoraConfig:
  """Converts a PEFT adapter folder for the base model at `base` (a checkpoint of ours, e.g. imported
  with `import`) into the LoRA checkpoint `<out>/checkpoints/0`; returns its LoraConfig."""
  log = log or hf.silent
  out_dir = os.path.join(out, 'checkpoints')
  if os.path.exists(os.path.join(out_dir, '0')):
    raise FileExistsError(f'{out_dir}/0 exists already; choose a new --out')
  cfg = params.load_model_config(base)
  lora, weights = peft.read(adapter_dir, cfg, f'--base {base}')
  base_weights = adapters.load_plain_numpy(base, cfg)
  params.save_params(out_dir, cfg, weights,
                     lora=adapters.base_pointer(base, adapters.fingerprint(base_weights), lora))
  log(f'Wrote {out_dir}/0: LoRA rank {lora.rank} adapters on {lora.targets} over {base}')
  return lora


def _copy_tokenizer(path: str, out: str, log):
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  copied = []
  if os.path.isfile(path) and path.endswith('.model'):
    shutil.copyfile(path, os.path.join(out, 'tokenizer.model'))
    copied.append('tokenizer.model')
  for name in TOKENIZER_FILES:
    src = os.path.join(folder, name)
    if os.path.isfile(src) and name not in copied:
      shutil.copyfile(src, os.path.join(out, name))
      copied.append(name)
  log(f'Copied tokenizer files {copied} from {folder}')


def write_chat_template(out: str, template: chat.ChatTemplate, log=print):
  """Puts `template` into out/tokenizer_config.json, where transformers and vLLM find it, with what
  transformers needs to tokenize it as we did: the named special tokens and, for a SentencePiece
  model, the LlamaTokenizer class with legacy=False (data/tokenizer.py)."""
  path = os.path.join(out, 'tokenizer_config.json')
  config = {}
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      config = json.load(f)
  for key, value in template.tokenizer.special_tokens_map.items():
    config.setdefault(key, value)
  if template.tokenizer.path.endswith('.model'):
    config.setdefault('tokenizer_class', 'LlamaTokenizer')
  if config.get('tokenizer_class') in ('LlamaTokenizer', 'LlamaTokenizerFast'):
    config.setdefault('legacy', False)  # transformers 4 defaulted to True
  source = template.standalone_source()
  if isinstance(config.get('chat_template'), list):  # named templates: ours becomes the default
    source = [t for t in config['chat_template'] if t.get('name') != 'default'] + [
        {'name': 'default', 'template': source}]
  config['chat_template'] = source
  hf.write_json(path, config)
  log(f'Wrote chat template {template.name} into {path}')


# --------------------------------------------------------------------------------------------------
# Checking a conversion against the original

# Prompts of `check` when none is given: prose, code and digits, a few dozen positions in all.
CHECK_PROMPTS = ('The capital of France is',
                 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""',
                 'In 1969, Neil Armstrong and Buzz Aldrin became the first people to walk on the Moon.')
# (max |logit difference|, max KL divergence) allowed, by compute dtype. float32 computes what the
# reference computes up to summation order; bfloat16 rounds every activation (MaxText's checks of
# bfloat16 models allow a KL divergence of about 0.015).
CHECK_TOLERANCES = {'float32': (1e-2, 1e-4), 'bfloat16': (1.0, 0.015), 'float16': (0.5, 0.01)}


class ReferenceUnavailable(RuntimeError):
  """torch or transformers is not installed: there is nothing to compare with."""


def reference_missing() -> str:
  """Why the original model cannot run here ('' when torch and transformers import)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel,unused-import
    import transformers  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    return (f'{e}: `check` compares with Hugging Face transformers, which needs torch and transformers '
            '(pip install transformers torch; a CPU build of torch is enough: pip install torch '
            '--index-url https://download.pytorch.org/whl/cpu)')
  return ''


def reference_logits(hf_dir: str, tokens: Sequence[Sequence[int]]) -> list[np.ndarray]:
  """transformers' float32 logits [T, V] for each token sequence, one sequence at a time."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    return [model(torch.tensor([list(t)])).logits[0].float().numpy() for t in tokens]


def our_logits(cfg: ModelConfig, weights, tokens: Sequence[Sequence[int]]) -> list[np.ndarray]:
  """Our float32 logits [T, V] for each token sequence: one jitted pass over them right-padded into
  one batch (causal attention keeps the padding out of every real position)."""
  batch = np.zeros((len(tokens), max(map(len, tokens))), np.int32)
  for row, t in zip(batch, tokens):
    row[:len(t)] = t
  logits = np.asarray(jax.jit(Transformer(cfg).apply)({'params': weights}, batch))
  return [logits[i, :len(t)] for i, t in enumerate(tokens)]


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_logits(ours: np.ndarray, reference: np.ndarray) -> dict[str, np.ndarray]:
  """Per position of logits [T, V]: the largest absolute difference, KL(reference || ours) of the
  next-token distributions, and whether the argmax agrees."""
  log_ref, log_ours = _log_softmax(reference), _log_softmax(ours)
  return {'max_abs_diff': np.abs(ours.astype(np.float64) - reference).max(axis=-1),
          'kl': (np.exp(log_ref) * (log_ref - log_ours)).sum(axis=-1),
          'top1_agrees': ours.argmax(-1) == reference.argmax(-1)}


def check(hf_dir: str, tokens: Sequence[Sequence[int]], ckpt: str | None = None, dtype: str | None = None,
          atol: float | None = None, max_kl: float | None = None, labels: Sequence[str] = (),
          decode=None, log=print) -> bool:
  """Compares our logits (of `ckpt`, or of `hf_dir` imported in memory) with transformers' on each
  token sequence; prints a row per position and a summary; returns whether both tolerances hold.
  Without torch and transformers, runs our model alone, then raises ReferenceUnavailable."""
  log = log or hf.silent
  missing = reference_missing()
  if missing:
    log(f'NOTE: there is no reference to compare with ({missing}); running our model alone')
  hf_cfg, arch, _ = hf.read_config(hf_dir, param_dtype='float32')
  dtype = compute_dtype(dtype)
  default_atol, default_kl = CHECK_TOLERANCES[dtype]
  atol, max_kl = default_atol if atol is None else atol, default_kl if max_kl is None else max_kl
  if ckpt:
    cfg = params.load_model_config(ckpt)
    different = [f'{f}: checkpoint {getattr(cfg, f)!r}, {hf_dir}/config.json {getattr(hf_cfg, f)!r}'
                 for f in ARCHITECTURE_FIELDS if getattr(cfg, f) != getattr(hf_cfg, f)]
    if different:
      raise ValueError(f'{ckpt} is not a conversion of {hf_dir}:\n  ' + '\n  '.join(different))
    cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype='float32')
    weights = params.load_params(ckpt, params.abstract_params_on(cfg))
    source = ckpt
  else:
    cfg = dataclasses.replace(hf_cfg, dtype=dtype)
    weights = hf.load_hf_params(hf_dir, cfg, DTYPES['float32'], log=None)
    source = f'{hf_dir} (imported in memory)'
  log(f'Ours: {source}, computed in {dtype} on {jax.devices()[0].platform}; {len(tokens)} prompt(s), '
      f'{sum(map(len, tokens))} positions')
  ours = our_logits(cfg, weights, tokens)
  del weights
  if missing:
    finite = all(np.isfinite(x).all() for x in ours)
    log(f'Our logits are {"finite" if finite else "NOT finite"}; next token after each prompt: '
        + ', '.join(str(int(x[-1].argmax())) for x in ours))
    raise ReferenceUnavailable(f'cannot run the original model: {missing}')
  log(f'Reference: transformers {hf.ARCH_CLASSES[arch]} in float32 on CPU')
  references = reference_logits(hf_dir, tokens)
  results = [compare_logits(a, b) for a, b in zip(ours, references)]
  for i, (seq, result) in enumerate(zip(tokens, results)):
    log(f'\nPrompt {i}' + (f': {labels[i]!r}' if i < len(labels) else '') + f' ({len(seq)} tokens)')
    log(f'  {"pos":>4}  {"token":>8}  {"max|dlogit|":>11}  {"KL":>9}  top-1')
    for t, token in enumerate(seq):
      piece = f'  {decode([token])!r}' if decode else ''
      log(f'  {t:4d}  {token:8d}  {result["max_abs_diff"][t]:11.3e}  {result["kl"][t]:9.2e}  '
          f'{"same" if result["top1_agrees"][t] else "DIFFERENT"}{piece}')
  every = {k: np.concatenate([r[k] for r in results]) for k in results[0]}
  max_diff, max_kl_seen = float(every['max_abs_diff'].max()), float(every['kl'].max())
  ok = max_diff <= atol and max_kl_seen <= max_kl
  log(f'\nmax |logit difference| {max_diff:.3e} (tolerance {atol:g}); KL divergence max '
      f'{max_kl_seen:.2e}, mean {every["kl"].mean():.2e} (tolerance {max_kl:g}); top-1 agreement '
      f'{int(every["top1_agrees"].sum())}/{every["top1_agrees"].size} positions '
      f'({100 * every["top1_agrees"].mean():.1f}%): ' + ('PASS' if ok else 'FAIL'))
  return ok


def _check_tokens(tokenizer_path: str | None, hf_dir: str, prompts: Sequence[str]):
  """(token sequences, labels, decode) for `check`: the prompts through the model's tokenizer (with
  BOS where the model expects one), or seeded random ids where the folder has no tokenizer."""
  path = tokenizer_path or hf_dir
  has_tokenizer = tokenizer_path or any(os.path.isfile(os.path.join(hf_dir, n))
                                        for n in ('tokenizer.json', 'tokenizer.model'))
  if not has_tokenizer:
    vocab = hf.read_config(hf_dir)[0].vocab_size
    print(f'NOTE: {hf_dir} has no tokenizer (and no --tokenizer was given): comparing on random token ids')
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab, n).tolist() for n in (7, 16, 25)], (), None
  tok = load_tokenizer(path)
  bos = [tok.bos_id] if tok.add_bos else []
  return [bos + tok.encode(p) for p in prompts], list(prompts), tok.decode


# --------------------------------------------------------------------------------------------------
# Command line

FLAGS = flags.FLAGS  # defined by define_flags() when run as a program
# Each command and the flags it needs (runtime.parse_command checks them).
COMMANDS = {'import': ('hf_dir', 'out'), 'export': ('ckpt', 'out'), 'check': ('hf_dir',),
            'export-peft': ('ckpt', 'out'), 'import-peft': ('adapter_dir', 'base', 'out')}


def main(argv):
  command = runtime.parse_command(argv, COMMANDS)
  runtime.setup(keep_freed_memory=False)
  # lexists: whatever stands there is read as a file (a FIFO or a folder is refused, naming it).
  if command in ('import', 'check') and not os.path.lexists(os.path.join(FLAGS.hf_dir, 'config.json')):
    raise app.UsageError(f'--hf-dir: {FLAGS.hf_dir} holds no config.json (expected a Hugging Face '
                         'model folder)')
  if FLAGS.ckpt and command != 'import':
    with runtime.flag_error('ckpt'):
      params.resolve_step_dir(FLAGS.ckpt)
  if command == 'import-peft':
    with runtime.flag_error('base'):
      params.resolve_step_dir(FLAGS.base)
    if not os.path.lexists(os.path.join(FLAGS.adapter_dir, peft.CONFIG)):
      raise app.UsageError(f'--adapter-dir: {FLAGS.adapter_dir} holds no {peft.CONFIG} (expected a '
                           'PEFT adapter folder)')
  if command == 'check':
    tokens, labels, decode = _check_tokens(FLAGS.tokenizer, FLAGS.hf_dir, FLAGS.prompt or CHECK_PROMPTS)
    try:
      ok = check(FLAGS.hf_dir, tokens, FLAGS.ckpt, FLAGS.dtype, FLAGS.atol, FLAGS.max_kl, labels, decode)
    except ReferenceUnavailable as e:
      print(f'check: {e}', file=sys.stderr)
      sys.exit(2)
    sys.exit(0 if ok else 1)
  elif command == 'import':
    overrides = {'scan_layers': FLAGS.scan_layers and not FLAGS['no-scan-layers'].value}
    if FLAGS.max_seq_len:
      overrides['max_seq_len'] = FLAGS.max_seq_len
    import_hf(FLAGS.hf_dir, FLAGS.out, FLAGS.dtype, FLAGS.tokenizer, **overrides)
  elif command == 'export-peft':
    export_peft(FLAGS.ckpt, FLAGS.out, FLAGS.base_name)
  elif command == 'import-peft':
    import_peft(FLAGS.adapter_dir, FLAGS.base, FLAGS.out)
  else:
    try:
      variables = chat.parse_variables(FLAGS.chat_template_kwargs, '--chat-template-kwargs')
    except chat.ChatFormatError as e:
      raise app.UsageError(str(e)) from None
    export_hf(FLAGS.ckpt, FLAGS.out, FLAGS.arch, FLAGS.dtype or 'bfloat16', FLAGS.tokenizer,
              int(FLAGS.shard_size_gb * 2**30), FLAGS.chat_template, FLAGS.chat_template_name, variables)


def define_flags():
  flags.DEFINE_string('hf_dir', None, 'import: folder with config.json and *.safetensors (e.g. a '
                      '`huggingface-cli download`).')
  flags.DEFINE_string('ckpt', None, 'export, export-peft: workdir, checkpoints folder or step folder. '
                      'check: the conversion to check (default: import --hf-dir in memory).')
  flags.DEFINE_string('out', None, 'import, import-peft: output folder (the checkpoint goes to '
                      'OUT/checkpoints/0); export, export-peft: the Hugging Face folder to write.')
  flags.DEFINE_enum('dtype', None, sorted(DTYPES), 'import: parameter dtype stored (default: config.json '
                    'torch_dtype, e.g. bfloat16; trainers cast to their own param_dtype when they load). '
                    'export: dtype of the safetensors (default bfloat16). check: our compute dtype '
                    '(default: float32 on CPU, bfloat16 on GPU/TPU; parameters are float32).')
  flags.DEFINE_string('tokenizer', None, 'Tokenizer (.model, tokenizer.json or its folder). import: '
                      'checked against the vocabulary; export: its files are copied and its BOS/EOS ids '
                      'written into config.json; check: tokenizes the prompts (default: --hf-dir\'s).')
  flags.DEFINE_multi_string('prompt', None, 'check: a prompt; repeat for several (default: three '
                            'built-in ones).')
  flags.DEFINE_float('atol', None, 'check: the largest logit difference allowed (default by --dtype: '
                     + ', '.join(f'{k} {v[0]:g}' for k, v in CHECK_TOLERANCES.items()) + ').',
                     lower_bound=0)
  flags.DEFINE_float('max_kl', None, 'check: the largest KL divergence allowed at any position (default '
                     'by --dtype: ' + ', '.join(f'{k} {v[1]:g}' for k, v in CHECK_TOLERANCES.items()) + ').',
                     lower_bound=0)
  flags.DEFINE_integer('max_seq_len', None, 'import: override max_seq_len (default: config.json '
                       'max_position_embeddings).', lower_bound=1)
  flags.DEFINE_bool('scan_layers', True, 'import: layers stacked on axis 0 (--noscan_layers or '
                    '--no-scan-layers: layers_0, layers_1, ...).')
  flags.DEFINE_enum('arch', None, sorted(hf.ARCH_CLASSES), 'export: architecture to write (default: '
                    'qwen3 when the model has q/k norms, qwen2 when it has q/k/v biases, else llama; '
                    'mistral and llama are the same function for full attention).')
  chat.define_template_flags('export: the chat template the model was tuned with (needs --tokenizer): '
                             'written into tokenizer_config.json, and its end-of-turn tokens into '
                             'generation_config.json.')
  flags.DEFINE_float('shard_size_gb', 5.0, 'export: largest safetensors file, in GB.')
  flags.register_validator('shard_size_gb', lambda gb: gb > 0, '--shard-size-gb must be positive')
  flags.DEFINE_string('adapter_dir', None, 'import-peft: a PEFT adapter folder (adapter_config.json, '
                      'adapter_model.safetensors).')
  flags.DEFINE_string('base', None, 'import-peft: the base model\'s checkpoint the adapter was made for.')
  flags.DEFINE_string('base_name', '', 'export-peft: base_model_name_or_path to write (default: the '
                      'base checkpoint\'s path), e.g. the Hugging Face name of the base model.')
  runtime.dashed_aliases(['hf_dir', 'max_seq_len', 'shard_size_gb', 'adapter_dir', 'base_name', 'max_kl'])
  flags.DEFINE_bool('no-scan-layers', False, 'import: the same as --noscan_layers.')


if __name__ == '__main__':
  define_flags()
  runtime.run(main)

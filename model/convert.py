"""`python -m model.convert`: Hugging Face model folders <-> our checkpoints (Llama, Mistral, Qwen2,
Qwen3), and a check that both compute the same logits.

  python -m model.convert import --hf-dir Meta-Llama-3-8B --out ckpt/llama3_8b [--tokenizer DIR]
  python -m model.convert export --ckpt runs/sft --out hf/my-model [--tokenizer DIR] [--arch llama] \
      [--chat-template llama3]
  python -m model.convert check --hf-dir Meta-Llama-3-8B [--ckpt ckpt/llama3_8b] [--prompt TEXT ...]

`import` reads `config.json` and the (sharded) safetensors, derives a ModelConfig (saying which preset it
matches), and writes `<out>/checkpoints/0/{state,model_config}`: the layout our trainers write, so that
`--config.init_from=<out>` and `python -m model.generate --ckpt <out>` read it. Peak memory stays near
one copy of the weights in the stored dtype (model/hf.py; docs/huggingface.md has the measured figure).

`export` is the inverse: safetensors (sharded past --shard-size-gb) plus `config.json` and
`generation_config.json`, which `transformers` (and vLLM) load as the same architecture, and the
tokenizer's files. No TensorFlow and no torch are imported.

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
from model import hf, params, runtime
from model.config import ARCHITECTURE_FIELDS, DTYPES, ModelConfig
from model.generate import compute_dtype
from model.transformer import Transformer

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'tokenizer.model')


def import_hf(hf_dir: str, out: str, dtype: str | None = None, tokenizer: str | None = None,
              log=print, **overrides) -> ModelConfig:
  """Converts a HF model folder into `<out>/checkpoints/0`; returns the ModelConfig written."""
  log = log or hf.silent
  with open(os.path.join(hf_dir, 'config.json')) as f:
    hf_config = json.load(f)
  if dtype is not None:
    overrides['param_dtype'] = dtype
  cfg, arch, notes = hf.config_from_hf(hf_config, **overrides)
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
  log(f'Wrote {out_dir}/0 ({nbytes / 2**30:.2f} GiB of {cfg.param_dtype} parameters)')
  return cfg


def export_hf(ckpt: str, out: str, arch: str | None = None, dtype: str = 'bfloat16',
              tokenizer: str | None = None, shard_size: int = 5 * 2**30, chat_template: str = '',
              log=print) -> dict:
  """Writes `out/` that `transformers.AutoModelForCausalLM.from_pretrained(out)` loads. Returns the
  config.json written. With `chat_template` (needs `tokenizer`), generation_config.json stops at the
  template's end-of-turn tokens too, as transformers' generate and vLLM read it."""
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
  if chat_template:
    if not tokenizer:
      raise ValueError('--chat-template needs --tokenizer (to look up its end-of-turn tokens)')
    stop_ids = list(dict.fromkeys(chat.get_template(chat_template).stop_ids(tok) + stop_ids))
  hf_config = hf.config_to_hf(cfg, arch, dtype, bos, eos)
  os.makedirs(out, exist_ok=True)
  weights = params.load_params_numpy(ckpt, cfg, dtype)
  hf.write_weights(out, hf.hf_tensors(weights, cfg, DTYPES[dtype]), shard_size, log)
  hf.write_json(os.path.join(out, 'config.json'), hf_config)
  generation = {'bos_token_id': bos, 'eos_token_id': stop_ids[0] if len(stop_ids) == 1 else (stop_ids or None)}
  hf.write_json(os.path.join(out, 'generation_config.json'),
                {k: v for k, v in generation.items() if v is not None})
  if tokenizer:
    _copy_tokenizer(tokenizer, out, log)
  log(f'Wrote {out}: {hf.ARCH_CLASSES[arch]}, {dtype}')
  return hf_config


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
  with open(os.path.join(hf_dir, 'config.json')) as f:
    hf_cfg, arch, _ = hf.config_from_hf(json.load(f), param_dtype='float32')
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
    with open(os.path.join(hf_dir, 'config.json')) as f:
      vocab = json.load(f)['vocab_size']
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
COMMANDS = {'import': ('hf_dir', 'out'), 'export': ('ckpt', 'out'), 'check': ('hf_dir',)}


def main(argv):
  command = runtime.parse_command(argv, COMMANDS)
  runtime.setup(keep_freed_memory=False)
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
  else:
    export_hf(FLAGS.ckpt, FLAGS.out, FLAGS.arch, FLAGS.dtype or 'bfloat16', FLAGS.tokenizer,
              int(FLAGS.shard_size_gb * 2**30), FLAGS.chat_template)


def define_flags():
  flags.DEFINE_string('hf_dir', None, 'import: folder with config.json and *.safetensors (e.g. a '
                      '`huggingface-cli download`).')
  flags.DEFINE_string('ckpt', None, 'export: workdir, checkpoints folder or step folder. check: the '
                      'conversion to check (default: import --hf-dir in memory).')
  flags.DEFINE_string('out', None, 'import: output folder (the checkpoint goes to OUT/checkpoints/0); '
                      'export: the Hugging Face folder to write.')
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
                     + ', '.join(f'{k} {v[0]:g}' for k, v in CHECK_TOLERANCES.items()) + ').')
  flags.DEFINE_float('max_kl', None, 'check: the largest KL divergence allowed at any position (default '
                     'by --dtype: ' + ', '.join(f'{k} {v[1]:g}' for k, v in CHECK_TOLERANCES.items()) + ').')
  flags.DEFINE_integer('max_seq_len', None, 'import: override max_seq_len (default: config.json '
                       'max_position_embeddings).')
  flags.DEFINE_bool('scan_layers', True, 'import: layers stacked on axis 0 (--noscan_layers or '
                    '--no-scan-layers: layers_0, layers_1, ...).')
  flags.DEFINE_enum('arch', None, sorted(hf.ARCH_CLASSES), 'export: architecture to write (default: '
                    'qwen3 when the model has q/k norms, qwen2 when it has q/k/v biases, else llama; '
                    'mistral and llama are the same function for full attention).')
  flags.DEFINE_string('chat_template', '', 'export: the chat template the model was tuned with '
                      '(data/chat.py): generation stops at its end-of-turn tokens (written to '
                      'generation_config.json).')
  flags.DEFINE_float('shard_size_gb', 5.0, 'export: largest safetensors file, in GB.')
  runtime.dashed_aliases(['hf_dir', 'max_seq_len', 'chat_template', 'shard_size_gb', 'max_kl'])
  flags.DEFINE_bool('no-scan-layers', False, 'import: the same as --noscan_layers.')


if __name__ == '__main__':
  define_flags()
  app.run(main)

"""`python -m model.convert`: Hugging Face model folders <-> our checkpoints (Llama, Mistral, Qwen2).

  python -m model.convert import --hf-dir Meta-Llama-3-8B --out ckpt/llama3_8b [--tokenizer DIR]
  python -m model.convert export --ckpt runs/sft --out hf/my-model [--tokenizer DIR] [--arch llama] \
      [--chat-template llama3]

`import` reads `config.json` and the (sharded) safetensors, derives a ModelConfig (saying which preset it
matches), and writes `<out>/checkpoints/0/{state,model_config}`: the layout our trainers write, so that
`--config.init_from=<out>` and `python -m model.generate --ckpt <out>` read it. Peak memory stays near
one copy of the weights in the stored dtype (model/hf.py; docs/huggingface.md has the measured figure).

`export` is the inverse: safetensors (sharded past --shard-size-gb) plus `config.json` and
`generation_config.json`, which `transformers` (and vLLM) load as the same architecture, and the
tokenizer's files. No TensorFlow and no torch are imported.
"""

import json
import os
import shutil

import jax
from absl import app, flags

from data import chat
from data.tokenizer import check_vocab, load_tokenizer
from model import hf, params, runtime
from model.config import DTYPES, ModelConfig

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
  arch = arch or ('qwen2' if cfg.qkv_bias else 'llama')
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
# Command line

FLAGS = flags.FLAGS  # defined by define_flags() when run as a program
# Each command and the flags it needs (runtime.parse_command checks them).
COMMANDS = {'import': ('hf_dir', 'out'), 'export': ('ckpt', 'out')}


def main(argv):
  command = runtime.parse_command(argv, COMMANDS)
  runtime.setup(keep_freed_memory=False)
  if command == 'import':
    if not os.path.isfile(os.path.join(FLAGS.hf_dir, 'config.json')):
      raise app.UsageError(f'--hf-dir: {FLAGS.hf_dir} holds no config.json (expected a Hugging Face '
                           'model folder)')
    overrides = {'scan_layers': FLAGS.scan_layers and not FLAGS['no-scan-layers'].value}
    if FLAGS.max_seq_len:
      overrides['max_seq_len'] = FLAGS.max_seq_len
    import_hf(FLAGS.hf_dir, FLAGS.out, FLAGS.dtype, FLAGS.tokenizer, **overrides)
  else:
    with runtime.flag_error('ckpt'):
      params.resolve_step_dir(FLAGS.ckpt)
    export_hf(FLAGS.ckpt, FLAGS.out, FLAGS.arch, FLAGS.dtype or 'bfloat16', FLAGS.tokenizer,
              int(FLAGS.shard_size_gb * 2**30), FLAGS.chat_template)


def define_flags():
  flags.DEFINE_string('hf_dir', None, 'import: folder with config.json and *.safetensors (e.g. a '
                      '`huggingface-cli download`).')
  flags.DEFINE_string('ckpt', None, 'export: workdir, checkpoints folder or step folder.')
  flags.DEFINE_string('out', None, 'import: output folder (the checkpoint goes to OUT/checkpoints/0); '
                      'export: the Hugging Face folder to write.')
  flags.DEFINE_enum('dtype', None, sorted(DTYPES), 'import: parameter dtype stored (default: config.json '
                    'torch_dtype, e.g. bfloat16; trainers cast to their own param_dtype when they load). '
                    'export: dtype of the safetensors (default bfloat16).')
  flags.DEFINE_string('tokenizer', None, 'Tokenizer (.model, tokenizer.json or its folder). import: '
                      'checked against the vocabulary; export: its files are copied and its BOS/EOS ids '
                      'written into config.json.')
  flags.DEFINE_integer('max_seq_len', None, 'import: override max_seq_len (default: config.json '
                       'max_position_embeddings).', lower_bound=1)
  flags.DEFINE_bool('scan_layers', True, 'import: layers stacked on axis 0 (--noscan_layers or '
                    '--no-scan-layers: layers_0, layers_1, ...).')
  flags.DEFINE_enum('arch', None, sorted(hf.ARCH_CLASSES), 'export: architecture to write (default: '
                    'qwen2 when the model has q/k/v biases, else llama; mistral and llama are the same '
                    'function for full attention).')
  flags.DEFINE_string('chat_template', '', 'export: the chat template the model was tuned with '
                      '(data/chat.py): generation stops at its end-of-turn tokens (written to '
                      'generation_config.json).')
  flags.DEFINE_float('shard_size_gb', 5.0, 'export: largest safetensors file, in GB.')
  flags.register_validator('shard_size_gb', lambda gb: gb > 0, '--shard-size-gb must be positive')
  runtime.dashed_aliases(['hf_dir', 'max_seq_len', 'chat_template', 'shard_size_gb'])
  flags.DEFINE_bool('no-scan-layers', False, 'import: the same as --noscan_layers.')


if __name__ == '__main__':
  define_flags()
  runtime.run(main)

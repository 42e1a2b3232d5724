"""`python -m model.generate`: talk to a checkpoint, through the sampler (model/inference/sampler.py).

  python -m model.generate --ckpt runs/sft --tokenizer demo/tokenizer.model \\
      --prompt "What is a generator?" --chat-template llama2 --max-new-tokens 64

`--tokenizer` takes a SentencePiece `.model`, a Hugging Face `tokenizer.json`, or a folder holding one
(e.g. the Hugging Face model folder a checkpoint was imported from); `--mesh 1,-1,1` shards the
parameters over every device (FSDP) and `--mesh 1,1,-1` over heads (tensor parallel).
"""

import dataclasses
import time

import jax
from absl import app, flags

from data import chat
from data.tokenizer import check_vocab, load_tokenizer
from model import sharding
from model.config import DTYPES, compute_dtype
from model.inference.sampler import Generator, SamplingConfig
from model.weights import adapters
from model.weights import params as params_lib
import runtime


def define_dtype_flag():
  """--dtype, the compute dtype, for every command that runs a model (see `compute_dtype`)."""
  flags.DEFINE_enum('dtype', None, sorted(DTYPES), 'Compute dtype of the model '
                    '(default: float32 on CPU, bfloat16 on GPU/TPU; the checkpoint\'s own setting is '
                    'for training).')


def load_model(ckpt, dtype: str | None = None, param_dtype: str | None = None, mesh=None):
  """(ModelConfig computing in `dtype` (default: `compute_dtype()`), LoraConfig, parameters placed on
  `mesh`) of a checkpoint. A LoRA checkpoint runs unmerged, over the base it refers to."""
  model_config, lora, params = adapters.load_model(ckpt, mesh, param_dtype or None)
  return dataclasses.replace(model_config, dtype=compute_dtype(dtype)), lora, params


def define_model_flags():
  """--mesh, --dtype and --param_dtype, which `model_from_flags` reads (model.generate, model.evaluate)."""
  flags.DEFINE_string('mesh', '', 'data,fsdp,tensor sizes to shard over (e.g. 1,-1,1); default: one '
                      'device.')
  define_dtype_flag()
  flags.DEFINE_enum('param_dtype', '', ['', *DTYPES], 'Cast the parameters to this dtype when loading '
                    '(default: as the checkpoint says, e.g. float32 after training; bfloat16 halves the '
                    'memory).')
  runtime.dashed_aliases(['param_dtype'])


FLAGS = flags.FLAGS  # defined by define_flags() when run as a program


def model_from_flags(tokenizer):
  """(ModelConfig, LoraConfig, parameters, mesh) of --ckpt, --dtype, --param_dtype and --mesh (flags
  of this command and model.evaluate), the flags and the vocabulary checked against `tokenizer` before
  any weights are read."""
  with runtime.flag_error('ckpt'):
    saved_config = params_lib.load_model_config(FLAGS.ckpt)
  with runtime.flag_error('tokenizer'):
    check_vocab(tokenizer, saved_config.vocab_size)
  mesh = None
  if FLAGS.mesh:
    with runtime.flag_error('mesh'):
      sizes = FLAGS.mesh.split(',')
      if len(sizes) != len(sharding.MESH_AXES) or not all(n.strip().lstrip('-').isdigit() for n in sizes):
        raise ValueError(f'expected {len(sharding.MESH_AXES)} comma-separated sizes '
                         f'({",".join(sharding.MESH_AXES)}, -1 for the rest), got {FLAGS.mesh!r}')
      mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, map(int, sizes))))
  # A LoRA checkpoint runs unmerged, over the base it refers to; both are checked against their
  # checksums as they load.
  return (*load_model(FLAGS.ckpt, FLAGS.dtype, FLAGS.param_dtype, mesh), mesh)


def main(argv):
  runtime.no_positional_arguments(argv)
  runtime.setup(keep_freed_memory=False)
  if FLAGS.system and not FLAGS.chat_template:
    raise app.UsageError('--system needs --chat-template (a system message is a turn of a template)')
  with runtime.flag_error('tokenizer'):
    tokenizer = load_tokenizer(FLAGS.tokenizer)

  template = chat.template_from_flags(tokenizer)
  if template:
    prompts = [template.prompt_ids(chat.conversation(p, FLAGS.system)) for p in FLAGS.prompt]
    stop_ids = template.stop_ids
  else:
    bos = [tokenizer.bos_id] if tokenizer.add_bos else []
    prompts = [bos + tokenizer.encode(p) for p in FLAGS.prompt]
    stop_ids = [tokenizer.eos_id]
  if not all(prompts):
    raise app.UsageError('--prompt: an empty prompt (this tokenizer starts texts without BOS, so it '
                         'would have no token)')
  model_config, lora, params, mesh = model_from_flags(tokenizer)
  generator = Generator(model_config, params, mesh, sharding.LOGICAL_AXIS_RULES, lora)
  sampling = SamplingConfig(FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_k, FLAGS.top_p,
                            FLAGS.seed, vocab_limit=tokenizer.vocab_size)
  compile_s = generator.compile(prompts, sampling, stop_ids, tokenizer.pad_id)
  start = time.perf_counter()
  outputs = generator.generate(prompts, sampling, stop_ids, tokenizer.pad_id)
  elapsed = time.perf_counter() - start
  for prompt, out in zip(FLAGS.prompt, outputs):
    print(f'>>> {prompt}\n{tokenizer.decode(out)}\n')
  n_tokens = sum(len(o) for o in outputs)
  print(f'{n_tokens} new tokens in {elapsed:.2f} s: {n_tokens / max(elapsed, 1e-9):.1f} tokens/s '
        f'(batch {len(prompts)}, prefill included; compiled in {compile_s:.1f} s, '
        f'{"mesh " + str(dict(mesh.shape)) if mesh else jax.devices()[0].platform}, compute '
        f'{model_config.dtype}, params {model_config.param_dtype})')


def define_flags():
  flags.DEFINE_string('ckpt', None, 'Workdir, checkpoints folder or step folder.', required=True)
  flags.DEFINE_string('tokenizer', None, 'SentencePiece .model, HF tokenizer.json, or a folder holding '
                      'one.', required=True)
  flags.DEFINE_multi_string('prompt', None, 'A prompt; repeat the flag for a batch.', required=True)
  chat.define_template_flags('Render each prompt as a user turn of this chat template (default: the '
                             'prompt as plain text).')
  flags.DEFINE_string('system', '', 'System message (with --chat-template).')
  flags.DEFINE_integer('max_new_tokens', 128, 'Tokens to generate at most.', lower_bound=1)
  flags.DEFINE_float('temperature', 0.0, '0: greedy.', lower_bound=0.0)
  flags.DEFINE_integer('top_k', 0, 'Sample among the k likeliest tokens (0: all).', lower_bound=0)
  flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling threshold (1: off).', lower_bound=0.0, upper_bound=1.0)
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  define_model_flags()
  runtime.dashed_aliases(['max_new_tokens', 'top_k', 'top_p'])


if __name__ == '__main__':
  define_flags()
  runtime.run(main)

"""`Run`: everything derived from a config that training and its tooling share.

The model, the mesh (over this host's devices, or over a TPU topology's compile-only devices for
train.compile), the optimizer, the state's and batch's shardings, and the jitted steps. The trainers
(train/loop.py), train.compile and train.benchmark all build one, so that what is compiled for a
slice or timed in a benchmark is exactly what training runs.
"""

from typing import Any, Sequence

import jax
from jax.sharding import Mesh

from data.batch import BATCH_KEYS
from model import Transformer
from model import sharding
from train import batches
from train import checkpoint
from train import optimizer as optimizer_lib
from train import state as state_lib
from train import step as step_lib
from train import validate


class Run:

  def __init__(self, config: Any, devices: Sequence[jax.Device] | None = None,
               tokenizer_vocab: int | None = None):
    """`devices`: this process's view of every device (default), or compile-only devices."""
    devices = list(devices if devices is not None else jax.devices())
    self.config = config
    self.lora = validate.lora_config(config)
    # config.model, or init_from's model; with LoRA, the frozen base is held in lora.base_dtype
    # (model/lora.py).
    self.model_config = self.lora.base_config(checkpoint.model_config(config))
    validate.check(config, self.model_config, len(devices), tokenizer_vocab, self.lora)
    self.mesh: Mesh = sharding.make_mesh(config.mesh, devices)
    self.model = Transformer(self.model_config, lora=self.lora)
    self.tx, self.schedule = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
    self.state_shardings = state_lib.state_shardings(self.model_config, self.tx, self.mesh,
                                                     lora=self.lora)
    self.batch_sharding = sharding.batch_sharding(self.mesh)

  def abstract_state(self):
    """The train state as ShapeDtypeStructs with their shardings (restore and compile targets)."""
    return state_lib.abstract_state(self.model_config, self.tx, self.mesh, lora=self.lora)

  def init_state(self, params=None, frozen=None):
    """A fresh state (see train/state.py `init_state`)."""
    return state_lib.init_state(self.model_config, self.tx, self.mesh, self.config.train.seed, params,
                                lora=self.lora, frozen=frozen)

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    shape = (self.config.train.batch_size, self.config.train.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_sharding)
            for k, dtype in BATCH_KEYS.items()}

  def train_step(self):
    tcfg = self.config.train
    step = step_lib.make_train_step(self.model, self.tx, self.schedule,
                                    grad_accum_steps=tcfg.grad_accum_steps, z_loss=tcfg.z_loss,
                                    loss_chunk_len=tcfg.loss_chunk_len, seed=tcfg.seed)
    return step_lib.jit_train_step(step, self.state_shardings, self.mesh)

  def eval_step(self):
    step = step_lib.make_eval_step(self.model, loss_chunk_len=self.config.train.loss_chunk_len)
    return step_lib.jit_eval_step(step, self.state_shardings.model_params, self.mesh)

  def global_batch(self, local_batch):
    return batches.global_batch_from_local(local_batch, self.batch_sharding,
                                           self.config.train.batch_size)


def define_flags(workdir: bool = True, lock_config: bool = True):
  """--config (a config file `path[:options]`, with --config.a.b=value overrides), the flag of every
  command that builds a Run, and --workdir for the trainers. Defined only when a command runs as a
  program: importing several entry points, as tests do, must not define a flag twice."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel  (not on GPU images)
  config_flags.DEFINE_config_file('config', None, 'Path to a config file (optionally :options).',
                                  lock_config=lock_config)
  flags.mark_flag_as_required('config')
  if workdir:
    flags.DEFINE_string('workdir', None, 'Checkpoints, logs and metrics go here; a run resumes '
                        'from the latest checkpoint in it.', required=True)

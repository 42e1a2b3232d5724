"""`Run`: everything derived from a config that training and its tooling share.

The model, the mesh (over this host's devices, or over a TPU topology's compile-only devices for
train.compile), the objective (`config.train.objective`: language modeling, or a preference loss from
`config.dpo`), the optimizer, the state's and batch's shardings, and the jitted steps. The trainers
(train/loop.py), train.compile and train.benchmark all build one, so that what is compiled for a
slice or timed in a benchmark is exactly what training runs.
"""

from typing import Any, Sequence

import jax
from jax.sharding import Mesh

from data.batch import batch_keys
from model import Transformer
from model import sharding
from train import batches
from train import optimizer as optimizer_lib
from train import policy_gradient as policy_gradient_lib
from train import start as start_lib
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
    # config.model, or init_from's model (train/start.py); with LoRA, the frozen base is held in
    # lora.base_dtype (model/lora.py).
    self.model_config = self.lora.base_config(start_lib.model_config(config))
    validate.check(config, self.model_config, len(devices), tokenizer_vocab, self.lora)
    self.mesh: Mesh = sharding.make_mesh(config.mesh, devices)
    self.model = Transformer(self.model_config, lora=self.lora)
    self.objective = self._objective()
    self.tx, self.schedule = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
    self.state_shardings = state_lib.state_shardings(self.model_config, self.tx, self.mesh,
                                                     lora=self.lora, reference=self.reference_in_state)
    self.batch_sharding = sharding.batch_sharding(self.mesh)

  def _objective(self):
    tcfg = self.config.train
    if validate.objective(self.config) == 'lm':
      return step_lib.LanguageModeling(self.model, tcfg.z_loss, tcfg.loss_chunk_len)
    if validate.objective(self.config) == 'grpo':
      grpo = self.config.grpo
      # The reference (beta > 0) runs in the step: the frozen start, with LoRA the base alone.
      reference = None
      if grpo.beta > 0:
        reference = (Transformer(self.model_config, lora=self.lora, use_adapters=False)
                     if self.lora.enabled else self.model)
      return policy_gradient_lib.PolicyGradient(
          self.model, grpo.loss_type, grpo.epsilon_low, grpo.epsilon_high, grpo.beta,
          grpo.max_completion_len, temperature=grpo.temperature, reference_model=reference,
          loss_chunk_len=tcfg.loss_chunk_len)
    dpo = self.config.dpo
    reference = None
    if dpo.loss not in step_lib.REFERENCE_FREE and dpo.reference == 'step':
      # With LoRA, the base alone: the same parameters with the adapters off.
      reference = (Transformer(self.model_config, lora=self.lora, use_adapters=False)
                   if self.lora.enabled else self.model)
    return step_lib.Preference(self.model, dpo.loss, dpo.beta, dpo.label_smoothing, dpo.simpo_gamma,
                               dpo.sft_weight, reference, tcfg.loss_chunk_len)

  @property
  def preference(self) -> bool:
    return isinstance(self.objective, step_lib.Preference)

  @property
  def policy_gradient(self) -> bool:
    return isinstance(self.objective, policy_gradient_lib.PolicyGradient)

  @property
  def reference_in_step(self) -> bool:
    """Whether the step runs a reference model (preference tuning with dpo.reference='step', or policy
    gradient's KL term): the frozen starting parameters, with LoRA the base alone."""
    return (self.preference or self.policy_gradient) and self.objective.reference_model is not None

  @property
  def reference_in_state(self) -> bool:
    """Whether the state holds a copy of the starting parameters: the reference model in the step,
    without LoRA (with it, the reference is the base, in the state already)."""
    return self.reference_in_step and not self.lora.enabled

  @property
  def precomputed_reference(self) -> bool:
    """Whether batches carry the reference's log-probabilities (`ref_logps`), computed before training."""
    return (self.preference and self.objective.loss not in step_lib.REFERENCE_FREE
            and self.objective.reference_model is None)

  def abstract_state(self):
    """The train state as ShapeDtypeStructs with their shardings (restore and compile targets)."""
    return state_lib.abstract_state(self.model_config, self.tx, self.mesh, lora=self.lora,
                                    reference=self.reference_in_state)

  def init_state(self, params=None, frozen=None):
    """A fresh state (see train/state.py `init_state`)."""
    return state_lib.init_state(self.model_config, self.tx, self.mesh, self.config.train.seed, params,
                                lora=self.lora, frozen=frozen, reference=self.reference_in_state)

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    shape = (self.config.train.batch_size, self.config.train.seq_len)
    keys = (policy_gradient_lib.batch_keys() if self.policy_gradient else
            batch_keys(self.preference, self.precomputed_reference))
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_sharding)
            for k, dtype in keys.items()}

  def train_step(self):
    tcfg = self.config.train
    step = step_lib.make_train_step(self.model, self.tx, self.schedule,
                                    grad_accum_steps=tcfg.grad_accum_steps, z_loss=tcfg.z_loss,
                                    loss_chunk_len=tcfg.loss_chunk_len, seed=tcfg.seed,
                                    objective=self.objective)
    return step_lib.jit_train_step(step, self.state_shardings, self.mesh)

  def eval_step(self):
    return step_lib.jit_eval_step(step_lib.make_eval_step(self.objective), self.state_shardings,
                                  self.mesh)

  def reference_step(self, with_adapters: bool = False):
    """The jitted reference pass of train/reference_pass.py on the starting parameters: the whole model's, with
    LoRA the base alone (or, `with_adapters`, the base joined with adapters a run starts from)."""
    model, shardings = self.model, self.state_shardings.model_params
    if self.lora.enabled and not with_adapters:
      model = Transformer(self.model_config, lora=self.lora, use_adapters=False)
      shardings = self.state_shardings.frozen
    step = step_lib.make_reference_step(model, self.config.train.loss_chunk_len)
    return step_lib.jit_reference_step(step, shardings, self.mesh)

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

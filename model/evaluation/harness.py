"""lm-evaluation-harness's model API (its TemplateLM) over a flaxlm model: the harness's tasks run in
process, every request type on the mesh: `loglikelihood` (multiple choice; model/inference/scoring.py),
`loglikelihood_rolling` (perplexity) and `generate_until` (model/generate.py's KV-cache Generator).

Each request is computed as the harness's Hugging Face backend (`lm_eval --model hf`) computes it, so
that scores compare with the numbers people publish (tests/test_evaluate.py checks them against it):
- text is tokenized as transformers tokenizes it (special tokens written in the text are single
  tokens), BOS first where the tokenizer's own post-processor adds one, unless the text starts with
  it (a chat template wrote it);
- perplexity windows are the harness's (`get_rolling_token_windows`, BOS as the prefix token, context
  length 1), so that, as in the hf backend, the first window also scores the BOS of the text;
- generation truncates each context to `max_length - max_gen_toks` tokens from the left, decodes
  greedily (or samples, with the task's temperature / top_k / top_p), stops at EOS (with a chat
  template also at its end-of-turn tokens) and cuts the text at the first of the task's stop
  sequences. A row also stops at a token whose text holds a stop sequence: the text after it would be
  cut anyway.

The parameters are whatever the caller loaded: plain weights, or LoRA adapters joined with their
frozen base (model/weights/adapters.py load_model), run unmerged with their `lora` config. Multi-host: every process reports itself as
the harness's only one (rank 0 of 1) and runs every request; the harness is deterministic (seeded,
local data), so every host issues the same computations on the mesh, as SPMD programs need. Write
files on process 0 only.
"""

import dataclasses
import json
import types
from typing import Any

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from model import sharding
from model.config import ModelConfig
from model.inference.sampler import Generator, SamplingConfig
from model.inference.scoring import Scorer
from model.lora import LoraConfig
from model.transformer import count_params

SAMPLING_KWARGS = ('do_sample', 'temperature', 'top_k', 'top_p')
_CONTINUE_TAG = 'CONTINUE_FINAL_MESSAGE_TAG '  # marks the end of a partial answer, as transformers does


class FlaxLM(TemplateLM):
  """A checkpoint's model for lm-evaluation-harness: `lm_eval.simple_evaluate(model=FlaxLM(...), ...)`.

  `tokenizer` and `template` are data/tokenizer.py and data/chat.py objects; give `template` when the
  harness applies a chat template (--apply_chat_template)."""

  def __init__(self, model_config: ModelConfig, params, tokenizer, template=None, *, mesh=None,
               batch_size: int = 16, max_length: int = 0, max_gen_toks: int = 256, seed: int = 0,
               info: dict[str, Any] | None = None, lora: LoraConfig = LoraConfig()):
    super().__init__()
    self._config, self._tok, self._template = model_config, tokenizer, template
    self._scorer = Scorer(model_config, params, mesh, batch_size=batch_size, max_length=max_length,
                          lora=lora)
    self._generator = Generator(model_config, params, mesh, sharding.LOGICAL_AXIS_RULES, lora)
    self.batch_size = self._scorer.batch_size
    self._max_gen_toks, self._seed = max_gen_toks, seed
    self._info = {'model_num_parameters': count_params(model_config), 'model_dtype': model_config.dtype,
                  **(info or {})}
    texts = tokenizer.control_tokens()
    self._prefix_text = texts.get(self.prefix_token_id)
    self._eot_text = texts.get(self.eot_token_id)
    self._piece_texts = None  # each id's text, for stop sequences; made on first use
    # What the harness logs of a transformers tokenizer (results' tokenizer_*_token).
    self.tokenizer = types.SimpleNamespace(
        pad_token=texts.get(tokenizer.pad_id), pad_token_id=tokenizer.pad_id,
        eos_token=self._eot_text, eos_token_id=tokenizer.eos_id,
        bos_token=texts.get(tokenizer.bos_id), bos_token_id=tokenizer.bos_id)

  # -- what the harness asks of a model ---------------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    return self._tok.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self._tok.bos_id  # Qwen-style tokenizers without a BOS have bos_id == eos_id

  @property
  def max_length(self) -> int:
    return self._scorer.max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def tokenizer_name(self) -> str:
    return self._tok.path.replace('/', '__')

  def get_model_info(self) -> dict:
    return dict(self._info)

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    ids = self._tok.encode_chat(string)[0]
    add_bos = self._tok.add_bos and add_special_tokens is not False
    if add_special_tokens is None and self._prefix_text and string.startswith(self._prefix_text):
      add_bos = False
    return [self._tok.bos_id] + ids if add_bos else ids

  def tok_decode(self, ids) -> str:
    return self._tok.decode(ids)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
    return self._scorer.score([(context, continuation) for _, context, continuation in requests],
                              progress=False if disable_tqdm else None)

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owners = [], []
    for i, (text,) in enumerate(r.args for r in requests):
      for window in lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1):
        windows.append(lm_utils.make_disjoint_window(window))
        owners.append(i)
    totals = [0.0] * len(requests)
    for i, (ll, _) in zip(owners, self._scorer.score(windows, progress=False if disable_tqdm else None)):
      totals[i] += ll
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    results: list[str | None] = [None] * len(requests)
    groups: dict[str, list[int]] = {}  # requests with the same generation kwargs run together
    for i, r in enumerate(requests):
      groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
    for indices in groups.values():
      until, sampling = self._sampling(requests[indices[0]].args[1])
      max_context = self.max_length - sampling.max_new_tokens
      if max_context <= 0:
        raise ValueError(f'a task asks for {sampling.max_new_tokens} new tokens (max_gen_toks), not less '
                         f'than the model\'s maximum length ({self.max_length})')
      contexts = {i: self.tok_encode(requests[i].args[0])[-max_context:] or [self.prefix_token_id]
                  for i in indices}
      order = sorted(indices, key=lambda i: -len(contexts[i]))
      stop_ids = self._stop_ids(until)
      for start in range(0, len(order), self.batch_size):
        batch = order[start:start + self.batch_size]
        prompts = [contexts[i] for i in batch]
        prompts += [prompts[-1]] * (self.batch_size - len(prompts))  # one program per prompt length
        seeded = dataclasses.replace(sampling, seed=self._seed + start)
        outputs = self._generator.generate(prompts, seeded, stop_ids, self._tok.pad_id, include_stop=True)
        for i, ids in zip(batch, outputs):
          results[i] = postprocess_generated_text(self.tok_decode(ids), until, None)
    return results

  def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The chat rendered as a string (tokenized again by tok_encode). Without the generation prompt,
    the last (assistant) message is a start to continue, as transformers' continue_final_message
    renders it. A template that refuses system messages gets the chat without them, as the hf
    backend does."""
    try:
      return self._render(chat_history, add_generation_prompt)
    except ValueError:  # data/chat.py's ChatFormatError
      if not any(m['role'] == 'system' for m in chat_history):
        raise
      return self._render([m for m in chat_history if m['role'] != 'system'], add_generation_prompt)

  def chat_template(self, chat_template: bool | str = False) -> str | None:
    """The template's source, which the harness logs (and hashes) in its results."""
    return self._template.standalone_source() if chat_template and self._template else None

  # -- helpers -----------------------------------------------------------------------------------

  def _render(self, messages, add_generation_prompt: bool) -> str:
    if self._template is None:
      raise ValueError('the harness applies a chat template, but none was given')
    if add_generation_prompt:
      return self._template.render(messages, add_generation_prompt=True)
    final = messages[-1]['content']
    text = self._template.render(list(messages[:-1]) + [{**messages[-1], 'content': final + _CONTINUE_TAG}])
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in text or tag not in text:
      raise ValueError(f'chat template {self._template.name} drops part of the final message, so it '
                       'cannot be continued')
    at = text.rindex(tag)
    return text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()

  def _sampling(self, gen_kwargs: dict) -> tuple[list[str], SamplingConfig]:
    """(stop sequences, sampling) of a task's generation kwargs, normalised as the harness does."""
    kwargs = dict(normalize_gen_kwargs(gen_kwargs, default_max_gen_toks=self.max_gen_toks))
    until = handle_stop_sequences(kwargs.pop('until', None), eos=self._eot_text)
    max_new_tokens = kwargs.pop('max_gen_toks')
    unsupported = {k: v for k, v in kwargs.items() if k not in SAMPLING_KWARGS}
    if unsupported:
      raise ValueError(f'generation kwargs {unsupported} are not supported; flaxlm takes '
                       f'{", ".join(SAMPLING_KWARGS)}')
    temperature = float(kwargs.get('temperature', 1.0)) if kwargs.get('do_sample') else 0.0
    return until, SamplingConfig(max_new_tokens, temperature, int(kwargs.get('top_k') or 0),
                                 float(kwargs.get('top_p') or 1.0), vocab_limit=self._tok.vocab_size)

  def _stop_ids(self, until: list[str]) -> list[int]:
    """EOS, the template's end-of-turn tokens, and every token whose text holds a stop sequence."""
    if self._piece_texts is None:
      self._piece_texts = [self._tok.decode([i]) for i in range(self._tok.vocab_size)]
    stops = [self.eot_token_id] + (self._template.stop_ids if self._template else [])
    stops += [i for i, text in enumerate(self._piece_texts) if any(s and s in text for s in until)]
    return list(dict.fromkeys(stops))

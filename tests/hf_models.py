"""Tiny transformers models with random weights, for the parity tests (imports torch: call it only from
tests that importorskip it)."""


def random_llama(vocab_size: int, seed: int = 0):
  """A 2-layer Llama (hidden 64, 4 heads of 16, 2 KV heads, MLP 96) in float32, its norms near 1 and
  its weights at scale 0.1, so that logits differ visibly between tokens."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5))
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(1 + 0.1 * torch.randn_like(p) if 'norm' in name else 0.1 * torch.randn_like(p))
  return model

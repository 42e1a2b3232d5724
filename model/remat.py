"""Named rematerialisation policies: what each decoder layer keeps for its backward pass.

From most to least memory; the rest is recomputed. 'none' (keep everything) applies no jax.checkpoint
at all. Names in `save_only_these_names` are the `checkpoint_name` tags in model/transformer.py.
"""

import jax

POLICIES = {
    'none': None,
    # Every weight matmul's output (MaxText's "minimal"): recompute only attention and elementwise ops.
    'save_dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # The attention block's matmul outputs; recompute the MLP (the largest activations).
    'save_dots_except_mlp': jax.checkpoint_policies.save_only_these_names(
        'query_proj', 'key_proj', 'value_proj', 'attention_out', 'attention_proj'),
    'save_attn': jax.checkpoint_policies.save_only_these_names(
        'query_proj', 'key_proj', 'value_proj', 'attention_out'),
    'save_qkv': jax.checkpoint_policies.save_only_these_names('query_proj', 'key_proj', 'value_proj'),
    # Only each layer's input: the whole layer is recomputed (about a third more FLOPs).
    'full': jax.checkpoint_policies.nothing_saveable,
}

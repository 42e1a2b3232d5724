"""Inference on live parameters: the sampler (prefill + decode with a KV cache, per-token
log-probabilities) and the scorer (log-likelihoods of continuations). Imports the network alone."""

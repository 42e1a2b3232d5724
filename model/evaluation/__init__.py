"""Evaluation of a model: lm-evaluation-harness's model API over the sampler and scorer, and task
metrics of generated answers (exact match, F1, ROUGE, BLEU, chrF)."""

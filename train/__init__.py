"""Training: the Run a config describes, the shared step and loop, checkpoints, and the trainers' entry points."""

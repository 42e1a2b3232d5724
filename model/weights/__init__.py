"""Weights on disk: our step folders (resolved, loaded with shape and checksum checks, written), LoRA
checkpoints and the base they refer to, and the Hugging Face and PEFT formats (safetensors, parameter
names and layouts). Imports the network (model/) and nothing above it."""

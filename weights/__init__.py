"""Safetensors checkpoints: open, detect layout and config, map keys, load strictly."""

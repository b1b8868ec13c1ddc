"""Formats other tools read and write: diffusers folders, single-file Stable Diffusion checkpoints, LoRA adapters."""

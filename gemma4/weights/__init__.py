"""Checkpoint files -> tensors -> model: Hugging Face safetensors layout, GGUF, Hub resolution."""

from .errors import CheckpointError
from .loader import load_model

__all__ = ["CheckpointError", "load_model"]

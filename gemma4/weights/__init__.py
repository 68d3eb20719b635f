"""Checkpoint files -> tensors -> model: Hugging Face safetensors layout, GGUF, Hub resolution;
and back: `save` writes every checkpoint directory gemma4 produces."""

from .errors import CheckpointError
from .loader import Checkpoint, load_model, open_checkpoint
from .save import save  # the function (its module stays importable as gemma4.weights.save for `from` imports)

__all__ = ["Checkpoint", "CheckpointError", "load_model", "open_checkpoint", "save"]

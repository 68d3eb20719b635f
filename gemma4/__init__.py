"""gemma4: run, chat with, quantize, fine-tune and serve Gemma 4 and Gemma 3 models in PyTorch.

    import gemma4
    model, tokenizer, chat = gemma4.load()    # embedded gemma-3-270m; or a dir, .gguf or Hub id
    gemma4.generate(model, tokenizer, "The capital of France is", max_tokens=20)
"""

from .api import ChatResponse, Loaded, chat_reply, default_model_path, load, load_model, stream_chat
from .config import TextConfig
from .engine.generate import GenerationResponse, batch_generate, generate, stream_generate
from .engine.sampling import SamplingParams
from .engine.core import Engine
from .engine.speculative import Speculation, make_speculation
from .model import Gemma
from .tokenizer import Tokenizer
from .transcription import Transcript, transcribe
from .weights import CheckpointError

__all__ = [
    "load", "load_model", "generate", "stream_generate", "batch_generate", "chat_reply", "stream_chat",
    "ChatResponse", "GenerationResponse", "SamplingParams", "Gemma", "TextConfig", "Tokenizer",
    "CheckpointError", "default_model_path", "Engine", "Loaded", "Speculation", "make_speculation",
    "transcribe", "Transcript",
]

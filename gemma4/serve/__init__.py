"""An OpenAI-compatible server: continuous batching, tools, thinking, structured output, safe defaults.

`build_app(model, tokenizer, config=ServeConfig(...))` returns the ASGI app; `serve_cli(args)` parses
the `gemma4 serve` flags, loads the model and runs uvicorn. See docs/serving.md.
"""

from .app import ServeConfig, ServedModel, build_app
from .cli import add_serve_arguments, load_checkpoint, serve_cli

__all__ = ["ServeConfig", "ServedModel", "build_app", "add_serve_arguments", "load_checkpoint", "serve_cli"]

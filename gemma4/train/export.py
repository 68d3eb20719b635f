"""A merged checkpoint: the adapter folded into the base weights, written by `gemma4.weights.save`."""

from __future__ import annotations

from pathlib import Path

from ..chat import ChatFormat
from ..model import Gemma
from ..weights import load_model, save
from ..weights.save import check_target
from .adapter import apply_adapter
from .lora import unload_lora


def export_merged(
    model: Gemma | None,
    directory: str | Path,
    *,
    source: str | Path | None = None,
    adapter_dir: str | Path | None = None,
    tokenizer=None,
    chat_format: ChatFormat | None = None,
) -> Path:
    """Write a full checkpoint (HF layout, safetensors, config.json, tokenizer) with the adapter folded in.

    Either `model` (float, LoRA applied: merged in place and unwrapped) or `source` + `adapter_dir`
    (the float base is loaded again and the adapter merged into it: the way for QLoRA and FSDP
    runs, whose training copy is quantized or sharded). The tokenizer files are copied from
    `source` when it is a checkpoint directory, else written from `tokenizer` and `chat_format`.
    Loadable by `gemma4.weights.load_model` and `gemma4.load`; refuses a non-empty `directory`.
    """
    check_target(directory, "export_merged")  # before merging anything
    if model is None:
        if source is None or adapter_dir is None:
            raise ValueError("export_merged needs a model, or the base checkpoint and the adapter directory")
        model = apply_adapter(load_model(source), adapter_dir)
    unload_lora(model, merge_weights=True)
    return save(directory, model, tokenizer=tokenizer, chat_format=chat_format, source=source)

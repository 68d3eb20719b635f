"""The one checkpoint writer: every model directory gemma4 produces (`gemma4 quantize`, `finetune
--export-merged`, `gemma4.quant.save_quantized`) is written by `save`, so all of them load the same way.

A directory holds model.safetensors (the tensors as the model holds them: a quantized weight as its
stored parts), config.json (the model's config, plus what the caller adds, e.g. gemma4.quant's
`quantization_config`: this layer does not know quantization) and the tokenizer files.
It is never written into a non-empty directory: nothing a user has is overwritten.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
from pathlib import Path
from typing import Any

import torch

from .loader import is_audio, is_vision
from .safetensors import SINGLE

log = logging.getLogger(__name__)

# What a checkpoint directory's tokenizer and prompt format consist of; copied as they are.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")


def check_target(directory: str | Path, what: str = "the output directory") -> Path:
    """Refuse a target that exists and is not an empty directory; callers check before long work."""
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(f"{what} {directory} already exists and is not an empty directory; "
                              "choose a new one (or delete it first)")
    return directory


def save(
    directory: str | Path,
    model: torch.nn.Module,
    *,
    tokenizer=None,
    chat_format=None,
    source: str | Path | None = None,
    quantization_config: dict[str, Any] | None = None,
) -> Path:
    """Write `model` as a checkpoint directory that `gemma4.load` reads; returns the directory.

    Tokenizer files are copied from `source` when it is a checkpoint directory; otherwise (a .gguf
    source, a Hub id, none) they are written from `tokenizer` (a gemma4 Tokenizer) with the template
    of `chat_format`, if it has one. `quantization_config` goes into config.json as given.
    """
    directory = check_target(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if getattr(model, "vision_config", None) is not None or getattr(model, "audio_config", None) is not None:
        # config.json here describes the text model only; its vision and audio sides are not written (yet).
        state = {k: v for k, v in state.items() if not (is_vision(k) or is_audio(k))}
        log.warning("%s: the vision and audio towers are not saved; the checkpoint written is the text model",
                    directory)
    write_safetensors(state, directory / SINGLE, metadata={"format": "pt"})
    config = model.config.to_hf_dict()
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    config["dtype"] = str(dtype).removeprefix("torch.")  # of the float tensors (informational, as HF writes it)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    _write_json(directory / "config.json", config)
    if source is not None and Path(source).is_dir():
        for name in TOKENIZER_FILES:
            if (Path(source) / name).is_file():
                shutil.copy2(Path(source) / name, directory / name)
    elif tokenizer is not None:
        write_tokenizer(directory, tokenizer, chat_format)
    else:
        log.warning("%s: no tokenizer given, none written; copy the base checkpoint's tokenizer files", directory)
    return directory


def write_tokenizer(directory: Path, tokenizer, chat_format=None) -> None:
    """tokenizer.json + tokenizer_config.json (special tokens, add_bos_token, chat template)."""
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    ids = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id, "pad_token": tokenizer.pad_id,
           "unk_token": tokenizer.unk_id}
    config: dict[str, Any] = {name: tokenizer.backend.id_to_token(i) for name, i in ids.items() if i is not None}
    config["add_bos_token"] = bool(tokenizer.add_bos)
    template = getattr(chat_format, "template", None)
    if template is not None:
        config["chat_template"] = template.source
    _write_json(directory / "tokenizer_config.json", config)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------
# A streaming safetensors writer

_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None,
                      ) -> None:
    """One tensor in memory at a time, shared storages allowed.

    `safetensors.torch.save_file` refuses tensors that share a storage (every tensor of a
    memory-mapped checkpoint does) and builds the whole file in memory. Tensors are written largest
    element first, so that every offset stays aligned for the zero-copy reader (header padded to 8
    bytes, as the format allows); the file appears under its name only once complete.
    """
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in _NAMES:
            raise ValueError(f"cannot save {name}: dtype {t.dtype} has no safetensors name")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = Path(str(path) + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in order:
            t = tensors[name].detach()
            if t.device.type != "cpu":
                t = t.cpu()
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    tmp.replace(path)

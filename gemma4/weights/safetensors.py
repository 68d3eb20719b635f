"""Hugging Face checkpoint directories: config.json plus one or several safetensors shards.

Tensors are opened with `safetensors.safe_open`, which memory-maps the file: a tensor whose
dtype already matches the requested one is used in place, without a second copy in RAM.
Never pickle: only safetensors files are read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{directory} has no config.json; point at a Hugging Face checkpoint directory "
            "(config.json + *.safetensors) or a .gguf file"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download or fix the file") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(raw).__name__}")
    return raw


def shard_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint, checked to exist."""
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e!r})") from None
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise CheckpointError(
                f"{index} lists shards that are missing: {', '.join(missing)}; the download is incomplete"
            )
        return [directory / n for n in names]
    if (directory / SINGLE).is_file():
        return [directory / SINGLE]
    found = sorted(directory.glob("*.safetensors"))
    if found:
        return found
    hint = " (PyTorch .bin files are not read: they are pickles; convert them to safetensors)" if any(
        directory.glob("*.bin")
    ) else ""
    raise CheckpointError(f"{directory} has config.json but no .safetensors weights{hint}")


def open_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor | None, tuple[int, ...]]]:
    """Yield (name, lazy getter, shape) for every tensor of the shards; headers are validated here."""
    for path in files:
        try:
            handle = safe_open(str(path), framework="pt")
            names = list(handle.keys())
        except Exception as e:  # safetensors raises its own error types for bad headers / truncation
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt: re-download it"
            ) from None
        for name in names:
            yield name, _Lazy(handle, name, path), tuple(handle.get_slice(name).get_shape())


class _Lazy:
    """Reads one tensor when called; read errors become CheckpointError naming the tensor."""

    def __init__(self, handle, name: str, path: Path):
        self.handle, self.name, self.path = handle, name, path

    def __call__(self) -> torch.Tensor:
        try:
            return self.handle.get_tensor(self.name)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {self.name} from {self.path} ({e}); re-download it") from None

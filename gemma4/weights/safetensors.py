"""Hugging Face checkpoint directories: config.json plus one or several safetensors shards.

`safetensors.safe_open` validates each file; the tensors are then views of a private memory map
of it, so a tensor whose dtype already matches the requested one is used in place, without a
second copy in RAM.
Never pickle: only safetensors files are read.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from collections.abc import Callable, Iterator
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


def open_tensors(files: list[Path]) -> Iterator[tuple[str, Callable[[], torch.Tensor], tuple[int, ...]]]:
    """Yield (name, getter, shape) for every tensor of the shards; headers are validated here.

    The getter returns a view into a private memory map of the file (no copy, pages shared with
    the OS cache) when the tensor's offset allows it, else a copy read by safetensors.
    """
    for path in files:
        try:
            handle = safe_open(str(path), framework="pt")  # validates header, offsets and file size
            names = list(handle.keys())
            header_len = struct.unpack("<Q", path.open("rb").read(8))[0]
            header = json.loads(path.open("rb").read(8 + header_len)[8:])
        except Exception as e:  # safetensors raises its own error types for bad headers / truncation
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt: re-download it"
            ) from None
        storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
        for name in names:
            info = header[name]
            yield name, _Mapped(storage, 8 + header_len, info, handle, name, path), tuple(info["shape"])


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class _Mapped:
    """One tensor of a safetensors file: a view of the mapped file, or a safetensors read."""

    def __init__(self, storage, data_start: int, info: dict, handle, name: str, path: Path):
        self.storage, self.data_start, self.info = storage, data_start, info
        self.handle, self.name, self.path = handle, name, path

    def __call__(self) -> torch.Tensor:
        dtype = _DTYPES.get(self.info["dtype"])
        offset = self.data_start + self.info["data_offsets"][0]
        if dtype is not None and offset % dtype.itemsize == 0:
            t = torch.empty(0, dtype=dtype)
            return t.set_(self.storage, offset // dtype.itemsize, self.info["shape"])
        try:
            return self.handle.get_tensor(self.name)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {self.name} from {self.path} ({e}); re-download it") from None

    def read_slice(self, block: dict[int, tuple[int, int]]) -> torch.Tensor:
        """The sub-block {dim: (lo, hi)} of this tensor, read with plain file reads (one per
        contiguous run) into fresh memory: only those bytes are read, and none of the rest of the
        file is mapped into the process (a memory map's fault-around would map neighbours too).
        A tensor-parallel rank's shard."""
        shape, dtype = list(self.info["shape"]), _DTYPES.get(self.info["dtype"])
        dims = sorted(block)
        if dtype is None:  # a dtype torch cannot view: safetensors reads it whole
            t = self()
            for d in dims:
                t = t.narrow(d, block[d][0], block[d][1] - block[d][0])
            return t.clone()
        last = dims[-1]
        inner = math.prod(shape[last + 1:])
        lo, hi = block[last]
        run = (hi - lo) * inner * dtype.itemsize  # bytes of one contiguous run
        outer = [range(*block.get(d, (0, shape[d]))) for d in range(last)]
        out_shape = [len(r) for r in outer] + [hi - lo] + shape[last + 1:]
        out = torch.empty(out_shape, dtype=dtype)
        buf = memoryview(out.view(torch.uint8).numpy()).cast("B")
        strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
        base = self.data_start + self.info["data_offsets"][0]
        with open(self.path, "rb", buffering=0) as f:
            for i, idx in enumerate(itertools.product(*outer)):
                f.seek(base + (sum(j * strides[d] for d, j in enumerate(idx)) + lo * inner) * dtype.itemsize)
                if f.readinto(buf[i * run : (i + 1) * run]) != run:
                    raise CheckpointError(f"{self.path} ended inside tensor {self.name}; re-download it")
        return out

"""A streaming safetensors writer: one tensor in memory at a time, shared storages allowed.

`safetensors.torch.save_file` refuses tensors that share a storage (every tensor of a memory-mapped
checkpoint does) and builds the whole file in memory; quantized models loaded zero-copy are saved
from their mapped views here instead. Tensors are written largest element first, so that every
offset stays aligned for the zero-copy reader (header padded to 8 bytes, as the format allows).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None,
                      ) -> None:
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

"""Sharded loading: each rank reads only its slices of the checkpoint, with the loader's strict checks.

The checks (missing, unexpected, mis-shaped tensors) run against the whole model's shapes, as in a
single-process load; then each of the rank's tensors is read as its slice, with plain file reads of
just its bytes (`_Mapped.read_slice`); replicated tensors stay views of the memory-mapped file, as
in a single-process load. A GGUF tensor is dequantized whole, then sliced (one tensor at a time).
A quantized checkpoint (gemma4.quant) comes with its `QuantizedParts` hooks: each rank reads only
its rows or input columns of every stored part (codes and their scales), as it does for floats.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..config import AudioConfig, TextConfig, VisionConfig
from ..model import Gemma
from ..weights.errors import CheckpointError
from ..weights.loader import Checkpoint, build, open_checkpoint, parse_dtype
from .layout import Layout
from .plan import ranges, shard_model, take


class QuantizedParts(Protocol):
    """What a quantized checkpoint's format (gemma4.quant.shard.QuantizedSlices) tells the loader."""

    def prepare(self, model: Gemma, qconfig: dict, dtype: torch.dtype) -> set[str]:
        """The loader's `prepare` hook, for the whole model (checked first) and then the rank's."""
        ...

    def blocks(self, name: str) -> list[dict[int, tuple[int, int]]] | None:
        """The rank's blocks of stored tensor `name`, or None when it is not a quantized part."""
        ...


@dataclass
class RankShard:
    """The loader's `Shard` hook for one rank."""

    config: TextConfig
    layout: Layout
    quantized: QuantizedParts | None = None
    qconfig: dict | None = None
    dtype: torch.dtype = torch.float32

    def model(self, config: TextConfig, vision: VisionConfig | None, audio: AudioConfig | None) -> Gemma:
        model = shard_model(config, self.layout, vision, audio)
        if self.quantized is not None:
            self.quantized.prepare(model, self.qconfig, self.dtype)
        return model

    def read(self, name: str, get: Callable[[], torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        blocks = self.quantized.blocks(name) if self.quantized is not None else None
        if blocks is None:
            blocks = ranges(self.config, self.layout, name, shape)
        if not blocks:
            return get()
        if hasattr(get, "read_slice"):
            parts = [get.read_slice(b) for b in blocks]
            return parts[0] if len(parts) == 1 else torch.cat(parts, max(blocks[0]))
        return take(get(), blocks).clone()


def load_sharded(source: str | Path | Checkpoint, layout: Layout, dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None, text_only: bool = False,
                 quantized: Callable[[dict, TextConfig, Layout], QuantizedParts] | None = None) -> Gemma:
    """This rank's part of the model (see module docstring). `quantized`: for a quantized
    checkpoint, what makes its hooks (gemma4.quant.shard.QuantizedSlices; gemma4.load passes it)."""
    device = torch.device(device or "cpu")
    dtype = parse_dtype(dtype, device)
    ckpt = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    parts = None
    if ckpt.quantization is not None:
        if quantized is None:
            raise CheckpointError(f"{ckpt.source} is a quantized checkpoint (gemma4.quant); load it with "
                                  "gemma4.load, which knows its format")
        parts = quantized(ckpt.quantization, ckpt.config, layout)
    shard = RankShard(ckpt.config, layout, parts, ckpt.quantization, dtype)
    return build(ckpt.config, ckpt.entries(dtype), dtype, device, str(ckpt.source), ckpt.quantization,
                 parts.prepare if parts is not None else None, vision=ckpt.vision, audio=ckpt.audio,
                 text_only=text_only, shard=shard)

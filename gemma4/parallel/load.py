"""Sharded loading: each rank reads only its slices of the checkpoint, with the loader's strict checks.

The checks (missing, unexpected, mis-shaped tensors) run against the whole model's shapes, as in a
single-process load; then each of the rank's tensors is read as its slice, with plain file reads of
just its bytes (`_Mapped.read_slice`); replicated tensors stay views of the memory-mapped file, as
in a single-process load. A GGUF tensor is dequantized whole, then sliced (one tensor at a time).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import AudioConfig, TextConfig, VisionConfig
from ..model import Gemma
from ..weights.errors import CheckpointError
from ..weights.loader import Checkpoint, build, open_checkpoint, parse_dtype
from .layout import Layout
from .plan import ranges, shard_model, take


@dataclass
class RankShard:
    """The loader's `Shard` hook for one rank."""

    config: TextConfig
    layout: Layout

    def model(self, config: TextConfig, vision: VisionConfig | None, audio: AudioConfig | None) -> Gemma:
        return shard_model(config, self.layout, vision, audio)

    def read(self, name: str, get, shape: tuple[int, ...]) -> torch.Tensor:
        blocks = ranges(self.config, self.layout, name, shape)
        if not blocks:
            return get()
        if hasattr(get, "read_slice"):
            parts = [get.read_slice(b) for b in blocks]
            return parts[0] if len(parts) == 1 else torch.cat(parts, max(blocks[0]))
        return take(get(), blocks).clone()


def load_sharded(source: str | Path | Checkpoint, layout: Layout, dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None, text_only: bool = False) -> Gemma:
    """This rank's part of the model (see module docstring)."""
    device = torch.device(device or "cpu")
    dtype = parse_dtype(dtype, device)
    ckpt = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    if ckpt.quantization is not None:
        raise CheckpointError(f"{ckpt.source}: --tp with a quantized checkpoint is not supported yet; load the "
                              "float checkpoint with --tp (each rank then holds 1/tp of it), or run on one process")
    return build(ckpt.config, ckpt.entries(dtype), dtype, device, str(ckpt.source), vision=ckpt.vision,
                 audio=ckpt.audio, text_only=text_only, shard=RankShard(ckpt.config, layout))

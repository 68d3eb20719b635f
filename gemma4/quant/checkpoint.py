"""Checkpoint files -> quantized model, one tensor at a time (float safetensors or GGUF Q4_K/Q8_0/...).

The model is planned on the meta device, then built by the production loader (`weights.build`)
from entries that quantize each float tensor when the loader asks for its first part and drop it
after the last: the peak is the quantized model plus one float32 tensor (for a GGUF, the one
tensor `GGUFFile.tensor` dequantizes). GGUF blocks (Q4_K, Q5_0, Q8_0, ...) are not carried over
bit for bit; they are dequantized and quantized again into our format.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from ..model import Gemma
from ..weights.errors import CheckpointError
from ..weights.loader import Checkpoint, build, canonical_name, open_checkpoint, parse_dtype
from .quantize import Predicate, default_predicate, prepare_quantized, quantization_config, quantize
from .tensor import QuantizedTensor

# The buffers of a QuantizedTensor, in state_dict (= loading) order.
PARTS = {8: ("qweight", "scales", "col_scales"), 4: ("qweight", "scales", "zeros", "col_scales")}


def quantize_checkpoint(
    path_or_id: str | Path | Checkpoint,
    scheme: str = "int4",
    group_size: int = 64,
    predicate: Predicate = default_predicate,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    revision: str | None = None,
) -> Gemma:
    """Load a float checkpoint directory, Hub id or .gguf file straight into a quantized model."""
    ckpt = path_or_id if isinstance(path_or_id, Checkpoint) else open_checkpoint(path_or_id, revision)
    if ckpt.quantization is not None:
        raise CheckpointError(f"{ckpt.source} is already quantized; quantize its float original instead")
    with torch.device("meta"):
        planned = quantize(Gemma(ckpt.config), scheme, group_size, predicate, progress=False)
    qconfig = quantization_config(planned, scheme, group_size)
    # GGUF tensors are dequantized to float32 for quantizing, whatever the compute `dtype`.
    entries = list(requantizing(ckpt.entries(torch.float32), qconfig["tensors"]))
    device = torch.device(device or "cpu")
    return build(ckpt.config, entries, parse_dtype(dtype, device), device, str(ckpt.source), qconfig,
                 prepare_quantized, text_only=True)  # the quantized model is the text model


def requantizing(entries, tensors: dict[str, dict]):
    """Loader entries (name, getter, shape) with each planned float weight replaced by its parts."""
    for name, get, shape in entries:
        spec = tensors.get(canonical_name(name) or "")
        if spec is None:
            yield name, get, shape
            continue
        job = _Job(get, spec)
        for i, part in enumerate(PARTS[spec["bits"]]):
            yield f"{name}.{part}", partial(job.part, i), _part_shape(tuple(shape), part, spec)


def _part_shape(shape: tuple[int, ...], part: str, spec: dict) -> tuple[int, ...]:
    if part == "col_scales":
        return (*shape[:-2], shape[-1])
    if spec["bits"] == 8:
        return shape if part == "qweight" else shape[:-1]
    return (*shape[:-1], shape[-1] // 2 if part == "qweight" else shape[-1] // spec["group_size"])


class _Job:
    """Quantizes one weight on the first request for a part; forgets it once every part was taken."""

    def __init__(self, get, spec: dict):
        self.get, self.spec = get, spec
        self.parts: tuple[torch.Tensor, ...] | None = None
        self.left = len(PARTS[spec["bits"]])

    def part(self, i: int) -> torch.Tensor:
        if self.parts is None:
            qt = QuantizedTensor.from_float(self.get(), self.spec["bits"], self.spec.get("group_size"))
            self.parts = tuple(getattr(qt, name) for name in PARTS[self.spec["bits"]])
        out = self.parts[i]
        self.left -= 1
        if self.left == 0:
            self.parts = None
        return out

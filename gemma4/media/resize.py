"""Resizing as the reference processors do it: torchvision's `resize(..., antialias=True)` on uint8 on CPU.

transformers' default (torchvision) image processors resize the uint8 tensor; torchvision hands uint8 to
`torch.nn.functional.interpolate` directly for bicubic, and for bilinear only on CPUs with AVX2/AVX512
or on ARM (torchvision 0.28, the release paired with torch 2.13); otherwise it resizes in float32, clamps (bicubic) and rounds back to uint8. We do the same, so pixels
equal the reference's bit for bit without depending on torchvision. (The reference's Pillow backend
differs from this by up to 2/255 on some pixels: Pillow and torch round their fixed-point filters
differently.)
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F

__all__ = ["resize_uint8"]


def resize_uint8(images: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize uint8 images (..., C, H, W) to `size` = (height, width) with `mode` bicubic or bilinear."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    shape = images.shape
    batch = images.reshape(-1, *shape[-3:]).contiguous()
    native = mode == "bicubic" or (mode == "bilinear" and _native_bilinear())
    if native:
        out = F.interpolate(batch, size=list(size), mode=mode, align_corners=False, antialias=True)
    else:
        out = F.interpolate(batch.float(), size=list(size), mode=mode, align_corners=False, antialias=True)
        if mode == "bicubic":
            out = out.clamp_(0, 255)
        out = out.round_().to(torch.uint8)
    return out.reshape(*shape[:-2], *size)


def _native_bilinear() -> bool:
    return (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
            or platform.machine() in ("aarch64", "arm64"))

"""Gemma 4 image inputs (spec 6.1, 6.4): aspect-preserving resize to a soft-token budget, 16-px patches.

Per image (RGB uint8, 3 x H x W):
- target sides are the largest multiples of 48 (pooling kernel 3 x patch 16) whose 16-px patch count
  fits `9 * budget`; a side that rounds to 0 becomes 48 and the other follows the aspect ratio, capped
  at `budget * 48` pixels (`target_size`);
- resize bicubic with antialias (skipped when the size already matches), then rescale by 1/255: no
  mean/std normalisation (the model maps pixels to [-1, 1] itself);
- 16 x 16 patches in row-major order, each flattened as (row, col, channel) = 768 values; position
  ids (x = column, y = row); padding to `9 * budget` patches with zero pixels and position (-1, -1).
Soft tokens per image = patches / 9 <= budget.

The 12B unified model ("encoder-free") takes 48 x 48 patches instead: the same resize, then one
6912-value patch per soft token, positions on the 48-px grid, padded to `budget` rows. This is what the
reference reaches by merging each 3 x 3 group of 16-px patches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .errors import MediaError
from .resize import resize_uint8

__all__ = ["SOFT_TOKEN_BUDGETS", "DEFAULT_BUDGET", "VIDEO_BUDGET", "target_size", "gemma4_image_inputs",
           "patchify"]

SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)
DEFAULT_BUDGET = 280  # the released processor_config's max_soft_tokens
VIDEO_BUDGET = 70  # per frame, the released video processor's max_soft_tokens
PATCH = 16
KERNEL = 3


def check_budget(budget: int) -> int:
    if budget not in SOFT_TOKEN_BUDGETS:
        raise MediaError(f"the image token budget must be one of {SOFT_TOKEN_BUDGETS}, got {budget!r}")
    return budget


def target_size(height: int, width: int, budget: int) -> tuple[int, int]:
    """(height, width) after the resize: multiples of 48 with at most 9 * budget 16-px patches."""
    side = KERNEL * PATCH
    max_pixels = budget * KERNEL**2 * PATCH**2
    factor = math.sqrt(max_pixels / (height * width))
    new_h = int(math.floor(factor * height / side)) * side
    new_w = int(math.floor(factor * width / side)) * side
    longest = budget * side
    if new_h == 0 and new_w == 0:  # cannot happen for a non-empty image; kept as a guard
        raise MediaError(f"an image of {width}x{height} cannot be resized to the 48-px grid")
    if new_h == 0:
        new_h, new_w = side, min(int(math.floor(width / height)) * side, longest)
    elif new_w == 0:
        new_h, new_w = min(int(math.floor(height / width)) * side, longest), side
    return new_h, new_w


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(..., C, H, W) -> (..., H/p * W/p, p * p * C): patches row-major, each laid out (row, col, channel)."""
    *lead, c, h, w = images.shape
    x = images.reshape(*lead, c, h // patch, patch, w // patch, patch)
    n = len(lead)
    x = x.permute(*range(n), n + 1, n + 3, n + 2, n + 4, n)
    return x.reshape(*lead, (h // patch) * (w // patch), patch * patch * c)


def grid_positions(rows: int, cols: int) -> torch.Tensor:
    """(rows * cols, 2) int64 positions (x = column, y = row) in row-major order."""
    y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1)


def pad_rows(values: torch.Tensor, positions: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad dim -2 to `length` with zero values and position (-1, -1)."""
    missing = length - values.shape[-2]
    if missing > 0:
        values = torch.nn.functional.pad(values, (0, 0, 0, missing), value=0)
        positions = torch.nn.functional.pad(positions, (0, 0, 0, missing), value=-1)
    return values, positions


def resized(image: torch.Tensor, budget: int) -> torch.Tensor:
    height, width = image.shape[-2:]
    return resize_uint8(image, target_size(height, width, budget), "bicubic")


def gemma4_image_inputs(
    images: Sequence[torch.Tensor], max_soft_tokens: int = DEFAULT_BUDGET, *, unified: bool = False
) -> dict:
    """The reference processor's outputs for RGB uint8 images (each 3 x H x W).

    Returns `pixel_values` float32 (N, 9*budget, 768) [unified: (N, budget, 6912)], `image_position_ids`
    int64 (N, rows, 2), and `num_soft_tokens_per_image` (list of ints).
    """
    budget = check_budget(max_soft_tokens)
    patch, length = (PATCH * KERNEL, budget) if unified else (PATCH, budget * KERNEL**2)
    pixels, positions, counts = [], [], []
    for image in images:
        _check_rgb(image)
        x = resized(image, budget) * (1 / 255)  # float32, as the reference's rescale
        rows, cols = x.shape[-2] // patch, x.shape[-1] // patch
        values, pos = pad_rows(patchify(x, patch), grid_positions(rows, cols), length)
        pixels.append(values)
        positions.append(pos)
        counts.append(rows * cols if unified else rows * cols // KERNEL**2)
    if not pixels:
        raise MediaError("no images given")
    return {
        "pixel_values": torch.stack(pixels),
        "image_position_ids": torch.stack(positions),
        "num_soft_tokens_per_image": counts,
    }


def _check_rgb(image: torch.Tensor) -> None:
    if not (isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.ndim == 3
            and image.shape[0] == 3 and image.shape[1] > 0 and image.shape[2] > 0):
        raise MediaError("processors take decoded RGB uint8 tensors (3, H, W); decode with gemma4.media.load_image")

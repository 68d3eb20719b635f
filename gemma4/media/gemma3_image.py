"""Gemma 3 image inputs (spec 7): every image (and pan-and-scan crop) becomes 896 x 896, normalised.

As the released preprocessor_config: resize to 896 x 896 bilinear with antialias, ignoring the aspect
ratio; rescale by 1/255 and normalise with mean = std = 0.5, i.e. (x - 127.5) / 127.5, which is how the
reference fuses the two steps. Each image gives 256 soft tokens (the model pools 4096 patches 4 x 4).

Pan-and-scan is off by default, as in the reference processor. When on, an image whose long side is at
least 1.2 x its short side is also cut into 2..4 equal crops along the long side (each crop at least
256 px, about square), every crop processed like an image; the original comes first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .errors import MediaError
from .gemma4_image import _check_rgb
from .resize import resize_uint8

__all__ = ["GEMMA3_SIZE", "GEMMA3_SOFT_TOKENS", "pan_and_scan_crops", "gemma3_image_inputs"]

GEMMA3_SIZE = 896
GEMMA3_SOFT_TOKENS = 256
MIN_CROP, MAX_CROPS, MIN_RATIO = 256, 4, 1.2


def pan_and_scan_crops(image: torch.Tensor, min_crop: int = MIN_CROP, max_crops: int = MAX_CROPS,
                       min_ratio: float = MIN_RATIO) -> list[torch.Tensor]:
    """The crops (views of `image`, 3 x h x w) pan-and-scan adds; [] when the image is not elongated enough."""
    height, width = image.shape[-2:]
    long, short = (width, height) if width >= height else (height, width)
    if long / short < min_ratio:
        return []
    count = int(math.floor(long / short + 0.5))  # round half up
    count = min(int(math.floor(long / min_crop)), count)
    count = min(max_crops, max(2, count))
    across, down = (count, 1) if width >= height else (1, count)
    crop_w, crop_h = int(math.ceil(width / across)), int(math.ceil(height / down))
    if min(crop_w, crop_h) < min_crop:
        return []
    return [image[:, top:top + crop_h, left:left + crop_w]
            for top in range(0, crop_h * down, crop_h) for left in range(0, crop_w * across, crop_w)]


def gemma3_image_inputs(images: Sequence[torch.Tensor], *, pan_and_scan: bool = False,
                        size: int = GEMMA3_SIZE) -> dict:
    """`pixel_values` float32 (N + crops, 3, size, size), each original followed by its crops, and
    `num_crops` (list of ints, one per original image)."""
    pixels, crops = [], []
    for image in images:
        _check_rgb(image)
        extra = pan_and_scan_crops(image) if pan_and_scan else []
        crops.append(len(extra))
        for piece in [image, *extra]:
            x = resize_uint8(piece, (size, size), "bilinear").float()
            pixels.append((x - 127.5) / 127.5)
    if not pixels:
        raise MediaError("no images given")
    return {"pixel_values": torch.stack(pixels), "num_crops": crops}

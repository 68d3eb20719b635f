"""Images in, RGB uint8 tensors out: the decoding rules every processor shares.

Accepted inputs: a path (str / PathLike), encoded bytes, a PIL image, or a uint8 array/tensor laid out
HWC (or HW greyscale) with 1, 3 or 4 channels. Everything goes through Pillow so one set of rules holds:
- EXIF orientation is applied (as transformers' `load_image` does for files);
- transparency (RGBA, LA, PA, palette or greyscale with a transparent colour) is composited onto white,
  the rule of the reference processors' `convert_to_rgb`; other modes (L, 1, P, CMYK, YCbCr) use
  Pillow's `convert("RGB")`;
- 16-bit images are scaled to 8 bits (value / 257, rounded). The reference converts them with
  `convert("RGB")`, which clips at 255 and turns most of a 16-bit image white; we keep the picture;
- an animated image (GIF, APNG, WebP) gives its first frame only;
- a decompression-bomb limit on width x height, checked from the header before any pixel is decoded.
Every failure is a `MediaError` naming the problem.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import MediaError

__all__ = ["DEFAULT_MAX_PIXELS", "load_image", "to_rgb_tensor"]

# 64 megapixels: a 8000x8000 photo decodes (192 MB as RGB); a crafted 100000x100000 header does not.
DEFAULT_MAX_PIXELS = 64_000_000
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def _pil():
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise MediaError("reading images needs Pillow: pip install 'gemma4[image]'") from None
    return Image, ImageOps


def load_image(source: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode `source` (path, bytes, PIL image, HWC uint8 array/tensor) to an RGB uint8 tensor (3, H, W)."""
    return to_rgb_tensor(_open(source, max_pixels), max_pixels)


def _open(source: Any, max_pixels: int):
    Image, _ = _pil()
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise MediaError(f"image file not found: {str(path)!r}")
        data = path.read_bytes()
        name = str(path)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), "image bytes"
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        return _from_array(source, max_pixels)
    else:
        raise MediaError(f"unsupported image input of type {type(source).__name__}: pass a path, bytes, "
                         "a PIL image, or an HWC uint8 array/tensor")
    if not data:
        raise MediaError(f"{name} is empty (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own limit below
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise MediaError(f"{name} is too large to decode safely ({e}); the limit is {max_pixels:,} pixels: "
                             "downscale it first") from None
        except Exception as e:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ValueError...
            raise MediaError(f"{name} is not a readable image ({type(e).__name__}: {e})") from None
    _check_size(image.size, max_pixels, name)
    return image


def _from_array(array: np.ndarray | torch.Tensor, max_pixels: int):
    Image, _ = _pil()
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    if array.dtype != np.uint8:
        raise MediaError(f"an image array must be uint8 (got {array.dtype}); scale it to 0..255 first")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise MediaError(f"an image array must be HWC with 1, 3 or 4 channels, or HW (got shape {tuple(array.shape)})")
    _check_size((array.shape[1], array.shape[0]), max_pixels, "image array")
    return Image.fromarray(np.ascontiguousarray(array))


def _check_size(size: tuple[int, int], max_pixels: int, name: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise MediaError(f"{name} has no pixels (size {width}x{height})")
    if width * height > max_pixels:
        raise MediaError(f"{name} is {width}x{height} = {width * height:,} pixels, over the limit of "
                         f"{max_pixels:,}; downscale it first")


def to_rgb_tensor(image, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """A PIL image (first frame, EXIF-oriented, composited on white) as an RGB uint8 tensor (3, H, W)."""
    Image, ImageOps = _pil()
    _check_size(image.size, max_pixels, "image")
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image)
        rgb = _convert_rgb(image, Image)
    except MediaError:
        raise
    except Exception as e:  # truncated data, broken EXIF, unsupported mode conversions
        raise MediaError(f"the image cannot be decoded ({type(e).__name__}: {e})") from None
    array = np.asarray(rgb, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _convert_rgb(image, Image):
    if image.mode in _SIXTEEN_BIT or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode in _SIXTEEN_BIT or values.max(initial=0) > 255:
            values = values / 257.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")

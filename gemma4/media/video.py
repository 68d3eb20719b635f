"""Video for Gemma 4: decode with PyAV, sample frames as the reference does, process each like an image.

Sampling follows the released video processor (`num_frames: 32`, `do_sample_frames: true`): 32 frame
indices spread uniformly over the whole clip, `i * total // 32`; a clip with fewer frames keeps all of
them (the reference raises there). Passing `fps` instead samples that many frames per second
(`max(1, int(total / video_fps * fps))` frames, the reference's rule), capped at `max_frames`: e.g.
`fps=1, max_frames=60` for "1 fps up to a minute". A frame's timestamp is `index / video_fps` seconds;
the prompt writes it as `mm:ss`.

Each frame is resized and patchified like an image with the video budget (70 soft tokens per frame by
default; 48-px patches for the 12B unified model, as its video processor merges them), and rescaled the way the reference's video path does it: `x / 255` (a division, which can
differ from the image path's `x * (1/255)` in the last float32 bit).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .decode import DEFAULT_MAX_PIXELS
from .errors import MediaError
from .gemma4_image import KERNEL, PATCH, VIDEO_BUDGET, check_budget, grid_positions, pad_rows, patchify, resized

__all__ = ["Video", "load_video", "sample_frame_indices", "gemma4_video_inputs", "DEFAULT_NUM_FRAMES"]

DEFAULT_NUM_FRAMES = 32


@dataclass
class Video:
    """Decoded frames (T, 3, H, W) uint8 and where they sit in the clip."""

    frames: torch.Tensor
    fps: float
    indices: list[int] = field(default_factory=list)

    @property
    def timestamps(self) -> list[float]:
        return [i / self.fps for i in self.indices]


def sample_frame_indices(total: int, video_fps: float, *, num_frames: int | None = DEFAULT_NUM_FRAMES,
                         fps: float | None = None, max_frames: int | None = None) -> list[int]:
    """Frame indices to keep from a clip of `total` frames (see the module docstring)."""
    if total <= 0:
        raise MediaError("the video has no frames")
    if fps is not None:
        count = max(1, int(total / video_fps * fps))
        if max_frames is not None:
            count = min(count, max_frames)
    else:
        count = num_frames or total
    count = min(count, total)
    return [i * total // count for i in range(count)]


def load_video(source: Any, *, num_frames: int | None = DEFAULT_NUM_FRAMES, fps: float | None = None,
               max_frames: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Video:
    """Decode a video file (path or bytes) and keep the sampled frames as RGB uint8."""
    try:
        import av
    except ImportError:
        raise MediaError("reading video needs PyAV: pip install 'gemma4[video]'") from None
    data = _read(source)
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise MediaError("the file has no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width and height and width * height > max_pixels:
                raise MediaError(f"video frames are {width}x{height}, over the limit of {max_pixels:,} pixels")
            rate = float(stream.average_rate) if stream.average_rate else 0.0
            total = stream.frames or _count_frames(container)
            if total <= 0:
                raise MediaError("the video has no frames")
            if rate <= 0:
                raise MediaError("the video does not state its frame rate")
            wanted = sample_frame_indices(total, rate, num_frames=num_frames, fps=fps, max_frames=max_frames)
            keep, kept = set(wanted), {}
            container.seek(0)
            for i, frame in enumerate(container.decode(video=0)):
                if i > wanted[-1]:
                    break
                if i in keep:
                    kept[i] = frame.to_ndarray(format="rgb24")
    except MediaError:
        raise
    except Exception as e:  # av.error.* (InvalidDataError, ...) and decoder failures
        raise MediaError(f"the video cannot be decoded ({type(e).__name__}: {e})") from None
    if not kept:
        raise MediaError("the video has no decodable frames")
    indices = sorted(kept)  # a clip shorter than its header says keeps the frames that exist
    frames = torch.from_numpy(np.stack([kept[i] for i in indices])).permute(0, 3, 1, 2).contiguous()
    return Video(frames=frames, fps=rate, indices=indices)


def _read(source: Any) -> bytes:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise MediaError(f"video file not found: {str(path)!r}")
        data = path.read_bytes()
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        raise MediaError(f"unsupported video input of type {type(source).__name__}: pass a path or bytes")
    if not data:
        raise MediaError("the video is empty (0 bytes)")
    return data


def _count_frames(container) -> int:
    count = sum(1 for _ in container.decode(video=0))
    container.seek(0)
    return count


def gemma4_video_inputs(videos: Sequence[Video], max_soft_tokens: int = VIDEO_BUDGET, *,
                        unified: bool = False) -> dict:
    """The reference video processor's outputs: `pixel_values_videos` float32 (frames, 9*budget, 768)
    [12B unified: (frames, budget, 6912), 48-px patches as for its images], `video_position_ids` int64
    (frames, rows, 2), `num_frames_per_video`, `num_soft_tokens_per_video` (soft tokens per frame) and
    `timestamps` (seconds, per video) for the prompt."""
    budget = check_budget(max_soft_tokens)
    patch, length = (PATCH * KERNEL, budget) if unified else (PATCH, budget * KERNEL**2)
    pixels, positions, frames, per_frame, stamps = [], [], [], [], []
    for video in videos:
        if not isinstance(video, Video) or video.frames.ndim != 4 or video.frames.shape[0] == 0:
            raise MediaError("a video needs at least one decoded frame (use gemma4.media.load_video)")
        x = resized(video.frames, budget).float() / 255.0
        rows, cols = x.shape[-2] // patch, x.shape[-1] // patch
        pos = grid_positions(rows, cols).expand(x.shape[0], -1, -1)
        values, pos = pad_rows(patchify(x, patch), pos, length)
        pixels.append(values)
        positions.append(pos)
        frames.append(x.shape[0])
        per_frame.append(rows * cols if unified else rows * cols // KERNEL**2)
        stamps.append(video.timestamps)
    if not pixels:
        raise MediaError("no videos given")
    return {
        "pixel_values_videos": torch.cat(pixels),
        "video_position_ids": torch.cat(positions),
        "num_frames_per_video": frames,
        "num_soft_tokens_per_video": per_frame,
        "timestamps": stamps,
    }

"""Images, video and audio -> model inputs and expanded prompts, equal to transformers' Gemma 3 / Gemma 4 processors.

Modules: `decode` (Pillow; any input -> RGB uint8), `resize` (torchvision's uint8 resize without
torchvision), `gemma4_image` / `gemma3_image` / `video` (pixels, positions, counts under the reference's
output names), `audio` (any audio input -> mono float32 at 16 kHz), `audio_features` (log-mel features or
the 12B's raw frames, reference names), `prompt` (placeholders -> tokens, ids and per-media spans),
`messages` (media parts of chat messages in placeholder order, data URLs). `process_prompt` runs them
all for one rendered chat prompt; docs/multimodal.md ("Processor", "Audio: processor") has the rules and
the deliberate differences from the reference. Pillow is the optional extra `image`, PyAV the extra
`video`, soundfile + soxr (+ PyAV for MP3) the extra `audio`; all are imported only when media are
decoded. Every bad input raises `MediaError` (a ValueError).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .audio import MAX_CLIP_SECONDS, MAX_DECODED_SECONDS, SAMPLING_RATE, load_audio
from .audio_features import audio_token_count, gemma4_audio_inputs
from .decode import DEFAULT_MAX_PIXELS, load_image, to_rgb_tensor
from .errors import MediaError
from .gemma3_image import GEMMA3_SOFT_TOKENS, gemma3_image_inputs, pan_and_scan_crops
from .gemma4_image import DEFAULT_BUDGET, SOFT_TOKEN_BUDGETS, VIDEO_BUDGET, gemma4_image_inputs, target_size
from .messages import data_url_bytes, media_parts
from .prompt import FAMILIES, Expansion, MediaSpan, expand_prompt
from .video import DEFAULT_NUM_FRAMES, Video, gemma4_video_inputs, load_video, sample_frame_indices

__all__ = [
    "MediaError", "MediaSpan", "Expansion", "MultimodalPrompt", "Video",
    "load_image", "to_rgb_tensor", "load_video", "sample_frame_indices",
    "gemma4_image_inputs", "gemma3_image_inputs", "gemma4_video_inputs", "pan_and_scan_crops", "target_size",
    "expand_prompt", "process_prompt", "media_key", "media_parts", "data_url_bytes",
    "DEFAULT_MAX_PIXELS", "DEFAULT_BUDGET", "VIDEO_BUDGET", "SOFT_TOKEN_BUDGETS", "DEFAULT_NUM_FRAMES",
    "GEMMA3_SOFT_TOKENS", "FAMILIES",
    "load_audio", "gemma4_audio_inputs", "audio_token_count", "SAMPLING_RATE", "MAX_CLIP_SECONDS",
    "MAX_DECODED_SECONDS",
]


@dataclass
class MultimodalPrompt:
    """One prompt's expanded text, ids, spans and pixel tensors (reference names; see `process_prompt`)."""

    text: str
    input_ids: list[int] | None
    spans: list[MediaSpan] | None
    mm_token_type_ids: list[int] | None
    image_inputs: dict | None = None
    video_inputs: dict | None = None
    audio_inputs: dict | None = None
    # Content hashes for an encoder cache: image_keys[span.item] for image spans, video_keys[span.item] for
    # frames, audio_keys[span.item] for audio clips.
    image_keys: list[str] = field(default_factory=list)
    video_keys: list[str] = field(default_factory=list)
    audio_keys: list[str] = field(default_factory=list)


def process_prompt(
    text: str,
    *,
    family: str,
    images: Sequence[Any] = (),
    videos: Sequence[Any] = (),
    audios: Sequence[Any] = (),
    tokenizer: Any = None,
    max_soft_tokens: int = DEFAULT_BUDGET,
    video_soft_tokens: int = VIDEO_BUDGET,
    unified: bool = False,
    pan_and_scan: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    encode: Any = None,
) -> MultimodalPrompt:
    """Decode and process `images` / `videos` and expand the placeholders of the rendered prompt `text`.

    `images`: paths, bytes, PIL images, HWC uint8 arrays, or RGB uint8 (3, H, W) tensors already
    decoded. `videos`: paths, bytes or `Video`s (Gemma 4 only). `unified` selects the 12B encoder-free
    input. `max_soft_tokens` is the per-request image budget (70/140/280/560/1120). `encode`:
    expanded text -> ids, instead of `tokenizer.encode(text, add_bos=False)` (see `expand_prompt`).
    """
    if family not in FAMILIES:
        raise MediaError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    decoded = [_rgb(image, max_pixels) for image in images]
    clips = [v if isinstance(v, Video) else load_video(v, max_pixels=max_pixels) for v in videos]
    if audios and family == "gemma3":
        raise MediaError("Gemma 3 models do not take audio")
    sounds = [load_audio(a, max_seconds=MAX_CLIP_SECONDS) for a in audios]
    image_inputs = video_inputs = audio_inputs = None
    if family == "gemma3":
        if clips:
            raise MediaError("Gemma 3 models do not take video; send frames as images")
        if decoded:
            image_inputs = gemma3_image_inputs(decoded, pan_and_scan=pan_and_scan)
        expansion = expand_prompt(text, family, num_crops=image_inputs["num_crops"] if decoded else (),
                                  tokenizer=tokenizer, encode=encode)
    else:
        if decoded:
            image_inputs = gemma4_image_inputs(decoded, max_soft_tokens, unified=unified)
        if clips:
            video_inputs = gemma4_video_inputs(clips, video_soft_tokens, unified=unified)
        if sounds:
            audio_inputs = gemma4_audio_inputs(sounds, unified=unified)
        expansion = expand_prompt(
            text, family,
            image_tokens=image_inputs["num_soft_tokens_per_image"] if decoded else (),
            video_tokens=video_inputs["num_soft_tokens_per_video"] if clips else (),
            timestamps=video_inputs["timestamps"] if clips else (),
            audio_tokens=audio_inputs["num_soft_tokens_per_audio"] if sounds else (),
            tokenizer=tokenizer,
            encode=encode,
        )
    image_keys = [media_key(x, f"{family}:{max_soft_tokens}:{unified}:{pan_and_scan}") for x in decoded]
    video_keys = [media_key(v.frames, f"video:{video_soft_tokens}:{unified}:{v.indices}") for v in clips]
    audio_keys = [media_key(a, f"audio:{SAMPLING_RATE}:{unified}") for a in sounds]
    return MultimodalPrompt(expansion.text, expansion.ids, expansion.spans, expansion.mm_token_type_ids,
                            image_inputs, video_inputs, audio_inputs, image_keys, video_keys, audio_keys)


def media_key(pixels: torch.Tensor, settings: str = "") -> str:
    """A content hash of decoded pixels or samples and the settings that shape their encoding (sha256 hex)."""
    digest = hashlib.sha256(settings.encode())
    digest.update(str(tuple(pixels.shape)).encode())
    digest.update(pixels.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _rgb(image: Any, max_pixels: int) -> torch.Tensor:
    if isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
        if image.dtype != torch.uint8:
            raise MediaError(f"a decoded image tensor must be uint8 (got {image.dtype})")
        return image.contiguous()
    return load_image(image, max_pixels=max_pixels)

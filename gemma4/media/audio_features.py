"""Model inputs from 16 kHz mono clips, under the reference's names (spec 6.2 "Features", 6.4 "Audio").

E2B / E4B (`gemma4_audio_inputs`): log-mel features as transformers' `Gemma4AudioFeatureExtractor`
computes them. The clips of one prompt are padded to the longest, then to a multiple of 128 samples;
160 zeros are prepended (semicausal framing); frames are 320 samples with hop 160, times a periodic
Hann window, rFFT 512, magnitude, 128 HTK mel filters over 0-8000 Hz without normalisation,
`log(mel + 0.001)`. A frame is valid iff the last sample of its 321-sample window is real audio;
invalid frames are zero. Each clip gives `ceil(ceil(valid / 2) / 2)` soft tokens (the encoder's two
stride-2 convolutions: the reference processor's `mask[::2]` twice), 25 per second.
The spectrum is computed in float64 and returned as float32.

12B unified (`unified=True`): no features; the samples cut into 640-sample frames (40 ms, the last one
zero-filled), one soft token per frame, padded with zero frames to the longest clip.

A clip longer than 30 s is refused rather than cut as the reference's extractor does: the model
hears at most 30 s; `gemma4 transcribe` windows longer recordings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch

from .audio import CLIP_HINT, MAX_CLIP_SECONDS, SAMPLING_RATE
from .errors import MediaError

__all__ = ["gemma4_audio_inputs", "audio_token_count", "MEL_BINS", "FRAME_SAMPLES"]

MEL_BINS = 128
FRAME_SAMPLES = 640  # 12B: samples per soft token
_WINDOW, _HOP, _FFT, _PAD_TO = 320, 160, 512, 128
_MEL_FLOOR, _MAX_HZ = 1e-3, 8000.0


def gemma4_audio_inputs(clips: Sequence[torch.Tensor], *, unified: bool = False) -> dict:
    """`input_features` float32 (clips, T, 128) [12B: (clips, T, 640)], `input_features_mask` bool
    (clips, T), and `num_soft_tokens_per_audio` (the prompt's audio token count per clip)."""
    clips = [_check_clip(clip, i, unified) for i, clip in enumerate(clips)]
    if not clips:
        raise MediaError("no audio given")
    if unified:
        return _frames(clips)
    longest = max(len(c) for c in clips)
    length = _ceil_div(longest, _PAD_TO) * _PAD_TO
    batch = torch.zeros(len(clips), length, dtype=torch.float64)
    for row, clip in enumerate(clips):
        batch[row, : len(clip)] = clip
    features = _log_mel(batch)
    frames = features.shape[1]
    # Frame i's window ends at sample i * 160 + 320 of the left-padded clip, i.e. i * 160 + 160 of the clip.
    window_ends = torch.arange(frames) * _HOP + _WINDOW // 2
    mask = window_ends[None, :] < torch.tensor([len(c) for c in clips])[:, None]
    features = (features * mask[..., None]).float()
    counts = [int(row[::2][::2].sum()) for row in mask]
    return {"input_features": features, "input_features_mask": mask, "num_soft_tokens_per_audio": counts}


def audio_token_count(samples: int, *, unified: bool = False) -> int:
    """Soft tokens a clip of `samples` 16 kHz samples takes in the prompt (0 if too short)."""
    if unified:
        return _ceil_div(samples, FRAME_SAMPLES)
    valid = (samples - _WINDOW // 2 - 1) // _HOP + 1 if samples > _WINDOW // 2 else 0
    return _ceil_div(_ceil_div(valid, 2), 2)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_clip(clip, index: int, unified: bool) -> torch.Tensor:
    if not isinstance(clip, torch.Tensor) or clip.ndim != 1 or not clip.is_floating_point():
        raise MediaError(f"audio clip {index} must be 1-D float samples at 16 kHz (use gemma4.media.load_audio)")
    if clip.numel() == 0:
        raise MediaError(f"audio clip {index} is empty")
    seconds = clip.numel() / SAMPLING_RATE
    if seconds > MAX_CLIP_SECONDS:
        raise MediaError(f"audio clip {index} is {seconds:.1f} s long; {CLIP_HINT}")
    if not audio_token_count(clip.numel(), unified=unified):
        raise MediaError(f"audio clip {index} is too short ({clip.numel()} samples at 16 kHz); it needs at least "
                         f"{_WINDOW // 2 + 1} samples (about 10 ms)")
    return clip.detach().to("cpu", torch.float64)


def _log_mel(batch: torch.Tensor) -> torch.Tensor:
    padded = torch.nn.functional.pad(batch, (_WINDOW // 2, 0))
    frames = padded.unfold(-1, _WINDOW + 1, _HOP)[..., :_WINDOW]
    spectrum = torch.fft.rfft(frames * _hann(), n=_FFT).abs()
    return torch.log(spectrum @ _mel_filters() + _MEL_FLOOR)


@lru_cache(maxsize=1)
def _hann() -> torch.Tensor:
    """Periodic Hann window of 320 (rounded to float32 as the reference stores it)."""
    n = torch.arange(_WINDOW, dtype=torch.float64)
    return (0.5 - 0.5 * torch.cos(2 * math.pi * n / _WINDOW)).float().double()


@lru_cache(maxsize=1)
def _mel_filters() -> torch.Tensor:
    """(257, 128) triangular HTK-mel filters over 0-8000 Hz, peak 1, no area normalisation."""
    mel = lambda hz: 2595.0 * torch.log10(1.0 + hz / 700.0)  # noqa: E731
    edges_mel = torch.linspace(0.0, float(mel(torch.tensor(_MAX_HZ, dtype=torch.float64))), MEL_BINS + 2,
                               dtype=torch.float64)
    edges = 700.0 * (10.0 ** (edges_mel / 2595.0) - 1.0)
    bins = torch.linspace(0.0, SAMPLING_RATE // 2, _FFT // 2 + 1, dtype=torch.float64)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins[:, None] - lower) / (centre - lower)
    falling = (upper - bins[:, None]) / (upper - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0.0)


def _frames(clips: list[torch.Tensor]) -> dict:
    counts = [_ceil_div(len(c), FRAME_SAMPLES) for c in clips]
    features = torch.zeros(len(clips), max(counts), FRAME_SAMPLES, dtype=torch.float32)
    for row, clip in enumerate(clips):
        features[row].view(-1)[: len(clip)] = clip.float()
    mask = torch.arange(max(counts))[None, :] < torch.tensor(counts)[:, None]
    return {"input_features": features, "input_features_mask": mask, "num_soft_tokens_per_audio": counts}

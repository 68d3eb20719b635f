"""Audio in, mono float32 samples at the model's rate (16 kHz) out: the decoding rules of every audio path.

Accepted inputs: a path (str / PathLike), encoded bytes (a data URL's payload), or decoded samples with
their rate as a tuple `(array, rate)` or a dict `{"array": ..., "sampling_rate": ...}` (numpy or torch;
1-D, or 2-D with the shorter axis as channels). Rules:
- WAV / FLAC / OGG (and the other formats libsndfile reads) through soundfile; MP3, and anything
  soundfile refuses, through PyAV (FFmpeg), so MP3 decodes the same whichever libsndfile is installed;
- integer samples become float32 in [-1, 1] (int16 / 32768, int32 / 2^31, uint8 (x - 128) / 128);
- channels are averaged to mono (what transformers' `load_audio` does through librosa);
- the rate is converted to 16 kHz with soxr (high quality), then samples are clipped to [-1, 1];
- limits, each a `MediaError`: nothing decoded, more than `MAX_CHANNELS` channels, NaN or infinite
  samples, float samples far outside [-1, 1], and more than `max_seconds` (2 hours by default) of
  decoded audio, checked from the header before decoding where the header says.
Long recordings are decoded whole here and windowed by `gemma4 transcribe`; a chat prompt decodes with
`max_seconds=MAX_CLIP_SECONDS`, so a long part is refused from its header, pointing to `transcribe`.
"""

from __future__ import annotations

import io
import itertools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import MediaError

__all__ = ["SAMPLING_RATE", "MAX_CHANNELS", "MAX_CLIP_SECONDS", "MAX_DECODED_SECONDS", "load_audio",
           "to_model_rate"]

SAMPLING_RATE = 16_000
MAX_CLIP_SECONDS = 30  # what the model hears of one clip (750 tokens)
CLIP_HINT = (f"the model hears at most {MAX_CLIP_SECONDS} s per clip: send a shorter clip, or use "
             "`gemma4 transcribe FILE` for long recordings")
MAX_CHANNELS = 8  # 7.1 surround; more is not a recording anyone speaks into
MAX_DECODED_SECONDS = 2 * 3600
_RATES = (1_000, 768_000)  # sample rates outside this range are a broken header or a mistake
_FLOAT_PEAK = 2.0  # float samples beyond this are integer PCM stored as float, not overshoot
_BLOCK = 1 << 20  # frames decoded at a time
_INT_SCALE = {np.dtype(np.int8): 128.0, np.dtype(np.int16): 32768.0, np.dtype(np.int32): 2.0**31}


def load_audio(source: Any, *, max_seconds: float = MAX_DECODED_SECONDS) -> torch.Tensor:
    """Decode `source` (see the module docstring) to mono float32 samples at 16 kHz, shape (N,)."""
    if isinstance(source, tuple) and len(source) == 2:
        samples, rate = source
    elif isinstance(source, Mapping) and "array" in source:
        samples, rate = source["array"], source.get("sampling_rate")
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        raise MediaError("decoded audio needs its sample rate: pass (array, rate) or "
                         "{'array': ..., 'sampling_rate': ...}")
    else:
        samples, rate = _decode(_read(source), max_seconds)
        return to_model_rate(samples, rate, max_seconds)
    return to_model_rate(_array_channels_last(samples), rate, max_seconds)


def to_model_rate(samples: np.ndarray, rate: Any, max_seconds: float = MAX_DECODED_SECONDS) -> torch.Tensor:
    """(frames, channels) or (frames,) samples at `rate` -> checked mono float32 at 16 kHz."""
    rate = _check_rate(rate)
    _check_length(len(samples), rate, max_seconds)  # before any copy
    samples = _mono(_to_float(samples))
    if samples.size == 0:
        raise MediaError("the audio is empty (0 samples)")
    if not np.isfinite(samples).all():
        raise MediaError("the audio has NaN or infinite samples")
    peak = float(np.abs(samples).max())
    if peak > _FLOAT_PEAK:
        raise MediaError(f"float audio samples must lie in [-1, 1] (peak {peak:.4g}); integer PCM stored as "
                         "float must be divided by its full scale (e.g. 32768 for 16-bit)")
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if rate != SAMPLING_RATE:
        samples = _soxr().resample(samples, rate, SAMPLING_RATE, quality="HQ").astype(np.float32, copy=False)
    return torch.from_numpy(np.clip(samples, -1.0, 1.0))


def _mono(samples: np.ndarray) -> np.ndarray:
    """(frames, channels) -> (frames,): the mean of the channels."""
    if samples.ndim == 1:
        return samples
    if samples.shape[1] > MAX_CHANNELS:
        raise MediaError(f"the audio has {samples.shape[1]} channels; at most {MAX_CHANNELS} are supported")
    return samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]


def _read(source: Any) -> bytes:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise MediaError(f"audio file not found: {str(path)!r}")
        data = path.read_bytes()
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        raise MediaError(f"unsupported audio input of type {type(source).__name__}: pass a path, bytes, "
                         "(array, rate) or {'array': ..., 'sampling_rate': ...}")
    if not data:
        raise MediaError("the audio is empty (0 bytes)")
    return data


def _decode(data: bytes, max_seconds: float) -> tuple[np.ndarray, int]:
    """Mono float32 samples and their rate: soundfile first, PyAV for MP3 and the rest. Channels are
    averaged block by block, so an hour of 48 kHz stereo never sits in memory as stereo."""
    sf = _soundfile()
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            if f.format != "MP3":
                _check_header(f.channels, f.samplerate, f.frames, max_seconds)
                blocks = [_mono(b) for b in f.blocks(_BLOCK, dtype="float32", always_2d=True)]
                if not blocks or not sum(len(b) for b in blocks):
                    raise MediaError("the audio file has no samples")
                return np.concatenate(blocks), f.samplerate
    except MediaError:
        raise
    except Exception as e:  # libsndfile: unknown format, truncated header, unsupported codec
        refused = str(getattr(e, "error_string", None) or e)
    else:
        refused = "MP3 goes to FFmpeg"
    return _decode_av(data, max_seconds, refused)


def _decode_av(data: bytes, max_seconds: float, refused: str) -> tuple[np.ndarray, int]:
    try:
        import av
    except ImportError:
        raise MediaError(f"the audio is not a format soundfile reads ({refused}); other formats (MP3, AAC, "
                         "...) need PyAV: pip install 'gemma4[audio]'") from None
    chunks, total = [], 0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise MediaError(f"not a readable audio file: no audio stream found ({refused})")
            stream = container.streams.audio[0]
            context = stream.codec_context
            if context is None or context.codec is None or context.name in (None, "", "none"):
                raise MediaError("the audio stream's codec is unknown or not supported")
            rate, channels = context.sample_rate, context.channels
            seconds = float(container.duration) / av.time_base if container.duration else 0.0
            _check_header(channels, rate, int(seconds * rate) if rate else 0, max_seconds)
            resampler = av.AudioResampler(format="fltp")  # keeps channels and rate; planar float32
            for frame in itertools.chain(container.decode(stream), [None]):  # None flushes the resampler
                for out in resampler.resample(frame):
                    chunks.append(_mono(out.to_ndarray().T))
                    total += len(chunks[-1])
                    _check_length(total, rate, max_seconds)
    except MediaError:
        raise
    except Exception as e:  # av.error.* (InvalidDataError, DecoderNotFoundError, ...)
        said = getattr(e, "strerror", None) or str(e)
        raise MediaError(f"not a readable audio file (soundfile: {refused}; FFmpeg: {said})") from None
    if not total:
        raise MediaError("the audio file has no decodable samples")
    return np.concatenate(chunks), rate


def _check_header(channels: int, rate: int, frames: int, max_seconds: float) -> None:
    if channels is not None and channels > MAX_CHANNELS:
        raise MediaError(f"the audio has {channels} channels; at most {MAX_CHANNELS} are supported")
    _check_rate(rate)
    _check_length(frames, rate, max_seconds)


def _check_length(frames: int, rate: int, max_seconds: float) -> None:
    if frames > max_seconds * rate:
        hint = CLIP_HINT if max_seconds <= MAX_CLIP_SECONDS else "cut it into parts first"
        raise MediaError(f"the audio is {frames / rate:,.1f} s long, over the limit of {max_seconds:,.0f} s; {hint}")


def _check_rate(rate: Any) -> int:
    try:
        value = int(rate)
    except (TypeError, ValueError):
        raise MediaError(f"the sample rate must be a whole number of Hz (got {rate!r})") from None
    if value != rate or not _RATES[0] <= value <= _RATES[1]:
        raise MediaError(f"the sample rate must be a whole number of Hz from {_RATES[0]:,} to {_RATES[1]:,} "
                         f"(got {rate!r})")
    return value


def _array_channels_last(samples: Any) -> np.ndarray:
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().cpu().numpy()
    if not isinstance(samples, np.ndarray):
        raise MediaError(f"decoded audio must be a numpy array or torch tensor (got {type(samples).__name__})")
    if samples.ndim == 2 and samples.shape[0] < samples.shape[1]:
        samples = samples.T  # (channels, frames) as torchaudio lays it out
    if samples.ndim not in (1, 2):
        raise MediaError(f"decoded audio must be 1-D, or 2-D with a channel axis (got shape {samples.shape})")
    return samples


def _to_float(samples: np.ndarray) -> np.ndarray:
    if samples.dtype in _INT_SCALE:
        return samples.astype(np.float32) / np.float32(_INT_SCALE[samples.dtype])
    if samples.dtype == np.uint8:
        return (samples.astype(np.float32) - 128.0) / 128.0
    if samples.dtype.kind == "f":
        return samples.astype(np.float32, copy=False)
    raise MediaError(f"audio samples must be int8/16/32, uint8 or float (got {samples.dtype})")


def _soundfile():
    try:
        import soundfile
    except (ImportError, OSError):
        raise MediaError("reading audio needs soundfile: pip install 'gemma4[audio]'") from None
    return soundfile


def _soxr():
    try:
        import soxr
    except ImportError:
        raise MediaError("resampling audio needs soxr: pip install 'gemma4[audio]'") from None
    return soxr

"""Long recordings -> windows the audio models take (at most 30 s each), cut at silences where they can.

The audio towers take clips of at most 30 s, so a longer recording is cut into windows. A cut is
placed at the quietest 20 ms frame of the last `search` seconds before the 30 s limit: between two
sentences when there is a pause, so no word is split. When even that frame is not silent (speech or
music all through), the next window starts `overlap` seconds before the cut, so a word cut at the
boundary is heard whole by one of the two windows, and `trim_repeat` later drops the words the two
transcripts then share. A window after a silent cut starts exactly at the cut: nothing is heard twice.

Everything here is sample arithmetic on a mono float tensor; decoding and resampling are the audio
loader's, running the windows through a model is `gemma4.transcription`'s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .audio_features import MAX_CLIP_SECONDS
from .errors import MediaError

__all__ = ["Window", "plan_windows", "trim_repeat", "WINDOW_SECONDS"]

WINDOW_SECONDS = float(MAX_CLIP_SECONDS)  # the longest clip the audio models take (spec 6.2)
FRAME_SECONDS = 0.02  # the energy frame a cut is placed in
SILENCE_DB = 35.0  # a frame this far below the recording's loud frames (95th percentile) is silence
MIN_TAIL_SECONDS = 1.0  # no window shorter than this is left at the end


@dataclass(frozen=True)
class Window:
    """Samples [start, end) of the recording; `overlap`: it starts before the previous window's end
    (the cut there was not silent), so its first words may repeat the previous window's last."""

    start: int
    end: int
    overlap: bool = False

    def seconds(self, rate: int) -> tuple[float, float]:
        return self.start / rate, self.end / rate


def plan_windows(samples: torch.Tensor, rate: int, *, max_seconds: float = WINDOW_SECONDS, search: float = 5.0,
                 overlap: float = 1.0) -> list[Window]:
    """Windows covering a mono recording in order, each at most `max_seconds` long (see the module
    docstring). One window when it fits. `search`: seconds before the limit where a cut may go."""
    if samples.dim() != 1:
        raise MediaError(f"windows are planned on mono samples (a 1-D tensor), not shape {tuple(samples.shape)}")
    if not 0 <= overlap < search < max_seconds or rate <= 0:
        raise MediaError(f"window settings need 0 <= overlap < search < max_seconds and a positive rate "
                         f"(got overlap={overlap}, search={search}, max_seconds={max_seconds}, rate={rate})")
    n, limit = samples.numel(), int(max_seconds * rate)
    if n == 0:
        raise MediaError("the recording is empty (0 samples)")
    if n <= limit:
        return [Window(0, n)]
    frame = max(1, int(FRAME_SECONDS * rate))
    energy = samples[: n // frame * frame].double().reshape(-1, frame).pow(2).mean(1)
    loud = float(torch.quantile(energy[:1_000_000].float(), 0.95)) if energy.numel() else 0.0
    silence = max(loud * 10 ** (-SILENCE_DB / 10), 1e-10)
    back, tail = int(overlap * rate), int(MIN_TAIL_SECONDS * rate)
    windows, start, overlapped = [], 0, False
    while n - start > limit:
        hi = min(start + limit, n - tail)  # the cut: at most `limit` in, and a tail of at least 1 s left
        lo = max(start + limit - int(search * rate), start + back + 1)
        first, last = -(-lo // frame), min(hi // frame, energy.numel())  # frames wholly inside [lo, hi)
        if last <= first:
            cut, quiet = hi, False
        else:
            region = energy[first:last]
            k = last - 1 - int(torch.argmin(region.flip(0)))  # the quietest frame, the latest of ties
            cut, quiet = min(k * frame + frame // 2, hi), bool(region.min() <= silence)
        windows.append(Window(start, cut, overlapped))
        start, overlapped = (cut, False) if quiet else (cut - back, back > 0)
    windows.append(Window(start, n, overlapped))
    return windows


_WORD = re.compile(r"\w+", re.UNICODE)


def trim_repeat(previous: str, text: str, max_words: int = 12) -> str:
    """`text` without the words it starts with that `previous` ends with (an overlap heard twice):
    the longest such run of up to `max_words` words, compared without case and punctuation."""
    before = [w.lower() for w in _WORD.findall(previous)][-max_words:]
    words = list(_WORD.finditer(text))
    for k in range(min(len(before), len(words)), 0, -1):
        if before[-k:] == [w.group().lower() for w in words[:k]]:
            return text[words[k - 1].end():].lstrip(" ,.;:!?-\u2014").lstrip()
    return text

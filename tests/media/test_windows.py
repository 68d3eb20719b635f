"""Long recordings cut into windows of at most 30 s (gemma4/media/windows.py): cuts at silences when
there are any, a 1 s overlap when there are none, every sample covered in order, and the words an
overlap hears twice dropped once."""

import pytest
import torch

from gemma4.media import MediaError
from gemma4.media.windows import Window, plan_windows, trim_repeat

RATE = 16_000
LIMIT = 30 * RATE


def _speech(seconds: float, talk: float, pause: float, seed: int = 0) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Noise bursts of `talk` seconds between pauses of `pause` seconds (a faint hiss, not zeros);
    returns the samples and the pauses' [start, end) sample ranges."""
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * RATE)
    block = torch.randn(RATE, generator=g)  # one second of noise, tiled (cheap on a loaded machine)
    x = block.repeat(int(seconds) + 1)[:n] * 1e-4
    pauses, at = [], 0
    while at < n:
        end = min(at + int(talk * RATE), n)
        x[at:end] *= 3000
        pauses.append((end, min(end + int(pause * RATE), n)))
        at = end + int(pause * RATE)
    return x, pauses


def _check_cover(windows: list[Window], n: int, overlap: int) -> None:
    assert windows[0].start == 0 and windows[-1].end == n and not windows[0].overlap
    for w in windows:
        assert 0 < w.end - w.start <= LIMIT
    for a, b in zip(windows, windows[1:]):
        assert b.start == (a.end - overlap if b.overlap else a.end)
        assert b.end > a.end


def test_a_short_recording_is_one_window():
    x = torch.randn(29 * RATE)
    assert plan_windows(x, RATE) == [Window(0, 29 * RATE)]
    assert plan_windows(x[:5], RATE) == [Window(0, 5)]
    assert plan_windows(torch.randn(LIMIT), RATE) == [Window(0, LIMIT)]


def test_cuts_fall_in_pauses_without_overlap():
    x, pauses = _speech(600, talk=6.3, pause=0.6)
    windows = plan_windows(x, RATE)
    _check_cover(windows, x.numel(), RATE)
    assert not any(w.overlap for w in windows)
    assert len(windows) >= 20  # 10 minutes in windows of at most 30 s
    for w in windows[:-1]:
        assert any(a <= w.end < b for a, b in pauses), f"cut at {w.end / RATE:.2f} s is not in a pause"
        assert w.end - w.start >= 25 * RATE  # the quiet frame was looked for in the last 5 s only


def test_without_pauses_windows_overlap_by_a_second():
    x = torch.randn(125 * RATE, generator=torch.Generator().manual_seed(1))
    windows = plan_windows(x, RATE)
    _check_cover(windows, x.numel(), RATE)
    assert all(w.overlap for w in windows[1:])
    assert windows[-1].end - windows[-1].start >= RATE  # no sliver left at the end


def test_silence_is_relative_to_the_recording_and_ties_cut_late():
    quiet, _ = _speech(95, talk=6.3, pause=0.6)
    windows = plan_windows(quiet * 1e-3, RATE)  # a very quiet recording still has its pauses
    assert not any(w.overlap for w in windows)
    zeros = plan_windows(torch.zeros(70 * RATE), RATE)  # all silence: cut as late as the limit allows
    assert all(LIMIT - RATE // 25 <= w.end - w.start <= LIMIT for w in zeros[:-1])  # within two 20 ms frames
    assert not any(w.overlap for w in zeros)


def test_custom_settings_and_a_short_tail():
    x = torch.randn(61 * RATE, generator=torch.Generator().manual_seed(2))
    windows = plan_windows(x, RATE, max_seconds=20, search=4, overlap=0.5)
    _check_cover(windows, x.numel(), RATE // 2)
    assert all(w.end - w.start <= 20 * RATE for w in windows)
    tail = plan_windows(torch.randn(LIMIT + 10), RATE)  # 10 samples past the limit: the cut leaves 1 s
    assert len(tail) == 2 and tail[-1].end - tail[-1].start >= RATE


@pytest.mark.parametrize("samples,kwargs,message", [
    (torch.zeros(2, 100), {}, "mono samples"),
    (torch.zeros(0), {}, "empty"),
    (torch.zeros(100), {"overlap": 5.0, "search": 5.0}, "window settings"),
    (torch.zeros(100), {"search": 40.0}, "window settings"),
])
def test_bad_window_inputs(samples, kwargs, message):
    with pytest.raises(MediaError, match=message):
        plan_windows(samples, RATE, **kwargs)


@pytest.mark.parametrize("previous,text,expected", [
    ("and then we went to the", "went to the market on Sunday.", "market on Sunday."),
    ("It was late. Very late.", "Very late, she said.", "she said."),
    ("nothing shared here", "At all.", "At all."),
    ("", "First words.", "First words."),
    ("the the the", "the end", "end"),
])
def test_trim_repeat(previous, text, expected):
    assert trim_repeat(previous, text) == expected

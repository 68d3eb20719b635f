"""gemma4/transcription.py without audio: windows run on a real scheduler at most `in_flight` at a time,
results come back in window order whatever order they finish in, and the joined transcript renders
OpenAI's formats (text, json, verbose_json segments, srt, vtt) with each window's timestamps."""

import json
import threading

import pytest
import torch
from testing_utils import random_model

from gemma4.engine.sampling import SamplingParams
from gemma4.engine.scheduler import GenerationRequest, Scheduler
from gemma4.media.windows import Window
from gemma4.transcription import (Segment, Transcript, TranscriptionCancelled, WindowResult, instruction,
                                  join_windows, run_windows)

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def model():
    return random_model("tiny-e2b")


def _request(i: int) -> GenerationRequest:
    g = torch.Generator().manual_seed(i)
    prompt = torch.randint(8, 120, (5 + 7 * (i % 3),), generator=g).tolist()
    return GenerationRequest(prompt, 3 + (i % 4), GREEDY, logprobs=0)


def test_windows_run_in_batches_and_come_back_in_order(model):
    alone = []
    scheduler = Scheduler(model, max_batch=1).start()
    try:
        for i in range(7):
            alone += run_windows(scheduler, lambda _, i=i: _request(i), 1, in_flight=1)
    finally:
        scheduler.stop()
    seen, peak, lock = [], 0, threading.Lock()
    scheduler = Scheduler(model, max_batch=4).start()
    made = []

    def make(i):
        nonlocal peak
        made.append(i)
        with lock:
            peak = max(peak, scheduler.stats().running + scheduler.stats().waiting + 1)
        return _request(i)

    try:
        together = run_windows(scheduler, make, 7, in_flight=3, on_result=lambda i, r: seen.append(i))
    finally:
        scheduler.stop()
    assert [r.tokens for r in together] == [r.tokens for r in alone]  # same greedy tokens, in window order
    assert made == list(range(7)) and sorted(seen) == list(range(7))
    assert peak <= 3  # never more than in_flight submitted at once
    assert all(len(r.logprobs) == len(r.tokens) and r.finish_reason == "length" for r in together)


def test_a_cancelled_run_cancels_its_windows(model):
    scheduler = Scheduler(model, max_batch=2).start()
    try:
        with pytest.raises(TranscriptionCancelled):
            run_windows(scheduler, lambda i: GenerationRequest([5, 6, 7], 400, GREEDY), 4, in_flight=2,
                        cancelled=lambda: True)
        for _ in range(200):  # the cancelled rows are freed at the scheduler's next step
            if scheduler.stats().running == scheduler.stats().waiting == 0:
                break
            threading.Event().wait(0.05)
        assert scheduler.stats().running == 0 and scheduler.stats().waiting == 0
    finally:
        scheduler.stop()


def _transcript() -> Transcript:
    windows = [Window(0, 480_000), Window(464_000, 960_000, overlap=True), Window(960_000, 1_000_000)]
    results = [WindowResult([1, 2], " Hello there, my friend. ", [-0.5, -1.5], "stop"),
               WindowResult([3], "My friend, how are you?", [-1.0], "stop"),
               WindowResult([], "", [], "stop")]
    return join_windows(windows, results, 16_000, "en")


def test_join_and_formats():
    t = _transcript()
    assert t.text == "Hello there, my friend. how are you?"
    assert [(s.start, s.end) for s in t.segments] == [(0.0, 30.0), (29.0, 60.0), (60.0, 62.5)]
    assert t.duration == 62.5 and t.segments[0].avg_logprob == -1.0
    assert t.render("json") == {"text": t.text}
    assert t.render("text") == t.text + "\n"
    verbose = t.render("verbose_json", 0.0)
    assert verbose["language"] == "en" and verbose["duration"] == 62.5 and len(verbose["segments"]) == 3
    assert verbose["segments"][1] | {"compression_ratio": 0} == {
        "id": 1, "seek": 2900, "start": 29.0, "end": 60.0, "text": "how are you?", "tokens": [3],
        "temperature": 0.0, "avg_logprob": -1.0, "compression_ratio": 0}
    json.dumps(verbose)
    assert t.render("srt") == ("1\n00:00:00,000 --> 00:00:30,000\nHello there, my friend.\n\n"
                               "2\n00:00:29,000 --> 00:01:00,000\nhow are you?\n")
    assert t.render("vtt").startswith("WEBVTT\n\n00:00:00.000 --> 00:00:30.000\nHello there")
    with pytest.raises(ValueError, match="response_format must be one of"):
        t.render("xml")


def test_long_timestamps_and_instruction():
    assert Transcript("x", 3725.5, [Segment(0, 3600.0, 3725.5, "x")]).render("srt") == (
        "1\n01:00:00,000 --> 01:02:05,500\nx\n")
    assert instruction() == "Transcribe this audio."
    assert instruction("fr", "Gemma, Kaggle") == ("Transcribe this audio. The speech is in French. "
                                                 "Context (names and spelling to follow): Gemma, Kaggle")
    assert instruction("pt-BR") == "Transcribe this audio. The speech is in pt-BR."

"""Transcribing recordings of any length: windows of at most 30 s, one chat request each, text joined in order.

    import gemma4
    model, tokenizer, chat_format = gemma4.load("google/gemma-4-E2B-it")
    result = gemma4.transcribe(model, tokenizer, "meeting.mp3", chat_format=chat_format)
    print(result.text)                      # or result.segments: start / end seconds and text per window

`transcribe` decodes the recording (`gemma4.media`: any file, bytes or (array, rate) it reads, up to
its length limit), plans windows (`gemma4.media.windows`: cuts at silences where it can), builds one
request per window (the audio, then the instruction `instruction(language, prompt)` as one user turn)
and runs them on a `Scheduler` `batch` at a time, so several windows share each forward. The server's
`/v1/audio/transcriptions` plans the same windows and runs the same `run_windows` on its own scheduler,
with its own (injection-safe) prompt encoding. docs/multimodal.md ("Audio: using it") has the choices.
"""

from __future__ import annotations

import queue
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .api import check_audio, media_prompt, turn_stop_ids
from .chat import ChatFormat
from .engine.sampling import SamplingParams
from .engine.scheduler import GenerationRequest, Scheduler, TokenEvent
from .media import SAMPLING_RATE as RATE  # the audio models' sample rate (spec 6.2)
from .media import load_audio
from .media.windows import plan_windows, trim_repeat
INSTRUCTION = "Transcribe this audio."
SOFT_TOKENS_PER_WINDOW = 750  # 30 s at 25 soft tokens a second (E2B/E4B and the 12B alike)
FORMATS = ("json", "text", "verbose_json", "srt", "vtt")

_LANGUAGES = {  # ISO-639-1 codes (what OpenAI's `language` takes) -> names the instruction uses
    "ar": "Arabic", "de": "German", "en": "English", "es": "Spanish", "fr": "French", "hi": "Hindi",
    "id": "Indonesian", "it": "Italian", "ja": "Japanese", "ko": "Korean", "nl": "Dutch", "pl": "Polish",
    "pt": "Portuguese", "ru": "Russian", "sv": "Swedish", "th": "Thai", "tr": "Turkish", "uk": "Ukrainian",
    "vi": "Vietnamese", "zh": "Chinese",
}


def instruction(language: str | None = None, prompt: str | None = None) -> str:
    """The user text sent with each window: "Transcribe this audio." (no wording for transcription is
    published for Gemma 4), the language when known, and the caller's context text."""
    text = INSTRUCTION
    if language:
        text += f" The speech is in {_LANGUAGES.get(language.lower(), language)}."
    if prompt:
        text += f" Context (names and spelling to follow): {prompt}"
    return text


def window_messages(clip: torch.Tensor, text: str) -> list[dict]:
    """One window as a chat: a user turn with the audio (16 kHz samples) and then the instruction."""
    return [{"role": "user", "content": [{"type": "audio", "audio": (clip, RATE)}, {"type": "text", "text": text}]}]


@dataclass
class WindowResult:
    tokens: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str


class TranscriptionCancelled(Exception):
    """`cancelled()` said stop (a client gone): the windows still running were cancelled."""


def run_windows(scheduler: Scheduler, make_request: Callable[[int], GenerationRequest], count: int, *,
                in_flight: int, on_result: Callable[[int, WindowResult], None] | None = None,
                cancelled: Callable[[], bool] | None = None) -> list[WindowResult]:
    """Run `count` requests (`make_request(i)`, built when submitted) on a running scheduler, at most
    `in_flight` at once, and return their results in order. An engine error ends it with a RuntimeError;
    `cancelled()` is polled and ends it with TranscriptionCancelled. Unfinished requests are cancelled."""
    events: queue.Queue[tuple[int, TokenEvent]] = queue.Queue()
    pieces: list[list[TokenEvent]] = [[] for _ in range(count)]
    results: list[WindowResult | None] = [None] * count
    handles, submitted, done = [], 0, 0

    def submit() -> None:
        nonlocal submitted
        i = submitted
        handles.append(scheduler.submit(make_request(i), lambda event: events.put((i, event))))
        submitted += 1

    try:
        while submitted < min(count, max(1, in_flight)):
            submit()
        while done < count:
            if cancelled is not None and cancelled():
                raise TranscriptionCancelled()
            try:
                i, event = events.get(timeout=0.25)
            except queue.Empty:
                if scheduler.dead is not None:
                    raise RuntimeError(f"the engine failed: {scheduler.dead}") from None
                continue
            if event.token is not None:
                pieces[i].append(event)
            if event.finish_reason is None:
                continue
            if event.finish_reason in ("error", "abort"):
                raise RuntimeError(f"window {i + 1} of {count} failed: {event.error or event.finish_reason}")
            got = pieces[i]
            results[i] = WindowResult([e.token for e in got], "".join(e.text for e in got),
                                      [e.logprob for e in got if e.logprob is not None], event.finish_reason)
            done += 1
            if on_result is not None:
                on_result(i, results[i])
            if submitted < count:
                submit()
    finally:
        for h in handles:
            if not h.finished:
                h.cancel()
    return results


@dataclass
class Segment:
    id: int
    start: float  # seconds
    end: float
    text: str
    tokens: list[int] = field(default_factory=list)
    avg_logprob: float = 0.0

    def as_openai(self, temperature: float) -> dict:
        data = self.text.encode()
        ratio = len(data) / len(zlib.compress(data)) if data else 0.0
        return {"id": self.id, "seek": round(self.start * 100), "start": self.start, "end": self.end,
                "text": self.text, "tokens": self.tokens, "temperature": temperature,
                "avg_logprob": self.avg_logprob, "compression_ratio": round(ratio, 4)}


@dataclass
class Transcript:
    """The joined transcription: its text, the recording's duration and one segment per window."""

    text: str
    duration: float
    segments: list[Segment]
    language: str | None = None

    def render(self, response_format: str, temperature: float = 0.0) -> str | dict:
        """OpenAI's shapes: a dict for json / verbose_json, a string for text / srt / vtt."""
        if response_format == "json":
            return {"text": self.text}
        if response_format == "verbose_json":
            return {"task": "transcribe", "language": self.language or "unknown", "duration": self.duration,
                    "text": self.text, "segments": [s.as_openai(temperature) for s in self.segments]}
        if response_format == "text":
            return self.text + "\n"
        if response_format in ("srt", "vtt"):
            comma = response_format == "srt"
            cues = [(f"{i}\n" if comma else "") + f"{_stamp(s.start, comma)} --> {_stamp(s.end, comma)}\n{s.text}\n"
                    for i, s in enumerate((s for s in self.segments if s.text), 1)]
            return ("" if comma else "WEBVTT\n\n") + "\n".join(cues)
        raise ValueError(f"response_format must be one of {', '.join(FORMATS)}, not {response_format!r}")


def _stamp(seconds: float, comma: bool) -> str:
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{',' if comma else '.'}{ms:03d}"


def join_windows(windows, results: list[WindowResult], rate: int = RATE, language: str | None = None,
                 clean: Callable[[str], str] = str.strip) -> Transcript:
    """One segment per window, in order, with its seconds; a window that overlaps the one before
    loses the words both heard (`trim_repeat`). `clean`: a window's raw text -> its transcript."""
    segments, previous = [], ""
    for i, (w, r) in enumerate(zip(windows, results)):
        text = clean(r.text)
        if w.overlap:
            text = trim_repeat(previous, text)
        start, end = w.seconds(rate)
        avg = sum(r.logprobs) / len(r.logprobs) if r.logprobs else 0.0
        segments.append(Segment(i, round(start, 3), round(end, 3), text, r.tokens, round(avg, 4)))
        previous = clean(r.text)
    text = " ".join(s.text for s in segments if s.text)
    duration = round(windows[-1].end / rate, 3) if windows else 0.0
    return Transcript(text, duration, segments, language)


def scheduler_len(max_tokens: int, instruction_tokens: int) -> int:
    """Tokens per row a window needs: its soft tokens, the chat markup (64 is ample), the instruction
    and the answer."""
    return SOFT_TOKENS_PER_WINDOW + 64 + instruction_tokens + max_tokens


def transcribe(model, tokenizer, audio, *, chat_format=None, language: str | None = None, prompt: str | None = None,
               max_tokens: int = 256, sampling: SamplingParams | None = None, batch: int = 4,
               on_window: Callable[[int, int, Segment], None] | None = None, mode: str = "eager") -> Transcript:
    """Transcribe a recording of any length (module docstring). `audio`: a path, bytes or (array, rate).
    Greedy unless `sampling` says otherwise. `batch`: windows run together. `on_window(done, total,
    segment)` is called as each window finishes (in completion order), e.g. for progress. `mode`: the
    decode step, as `Engine`'s ("compile" traces it)."""
    check_audio(model)
    fmt = chat_format or ChatFormat(model.config.family)
    samples = load_audio(audio)
    windows = plan_windows(samples, RATE)
    text = instruction(language, prompt)
    sampling = sampling or SamplingParams(temperature=0)
    stops = frozenset(turn_stop_ids(fmt, tokenizer))

    def request(i: int) -> GenerationRequest:
        w = windows[i]
        messages = window_messages(samples[w.start : w.end], text)
        ids, media = media_prompt(model, tokenizer, fmt.render(messages, add_generation_prompt=True), messages)
        return GenerationRequest(list(ids), max_tokens, sampling, stops, logprobs=0, tokenizer=tokenizer,
                                 media=media)

    done = 0

    def report(i: int, result: WindowResult) -> None:
        nonlocal done
        done += 1
        if on_window is not None:
            start, end = windows[i].seconds(RATE)
            on_window(done, len(windows), Segment(i, start, end, result.text.strip()))

    context = model.config.max_position_embeddings
    need = scheduler_len(max_tokens, len(tokenizer.encode(text, add_bos=False)))
    scheduler = Scheduler(model, max_batch=max(1, min(batch, len(windows))), max_queue=max(batch, 1),
                          max_len=min(context, need), vocab_limit=tokenizer.vocab_size, mode=mode)
    scheduler.start()
    try:
        results = run_windows(scheduler, request, len(windows), in_flight=batch, on_result=report)
    finally:
        scheduler.stop()
    return join_windows(windows, results, RATE, language, clean=lambda t: fmt.parse(t).content.strip())

"""`POST /v1/audio/transcriptions`: OpenAI's transcription route over the audio models, any length.

The body is multipart/form-data as OpenAI's: `file` (the recording: WAV, FLAC, OGG, MP3, ...), `model`,
and optional `language`, `prompt`, `response_format` (json, text, verbose_json, srt, vtt),
`temperature` (0 to 1, default 0) and our extension `max_tokens` (per window, default 256). The file
may be as large as any media input (`MediaPolicy.max_bytes`, 20 MB: an hour of speech at 32 kbit/s).
It is decoded and cut into windows of at most 30 s (gemma4.media.windows); each window becomes one chat
turn (the audio, then `instruction(language, prompt)`, encoded like every chat prompt here, so a user's
text cannot forge special tokens) and runs on the server's scheduler, at most half of its slots at a
time, so chat requests keep flowing beside a long recording. The texts are joined in order with each
window's start and end (gemma4.transcription).

Everything that costs time in proportion to the body (multipart parsing, decoding) runs in a worker
thread; every bad input is a 400 that says what is wrong; a client that leaves cancels its windows.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from ..api import NO_AUDIO
from ..config import ContextLengthError
from ..engine.sampling import SamplingParams
from ..engine.scheduler import GenerationRequest, QueueFullError, SchedulerClosedError
from ..media import MediaError, load_audio
from ..media.windows import plan_windows
from ..transcription import (FORMATS, RATE, TranscriptionCancelled, instruction, join_windows, run_windows,
                             window_messages)
from .checks import check_model
from .errors import APIError, bad_request, context_length_error, sanitize
from .media import process
from .prompts import PromptTooLong

if TYPE_CHECKING:
    from .app import ServeConfig, ServedModel

log = logging.getLogger(__name__)

MULTIPART_OVERHEAD = 64 * 1024  # bytes of form fields and headers allowed beside the file
MAX_PROMPT_CHARS = 4096
MAX_FIELDS = 16
WINDOW_MAX_TOKENS = 256  # tokens a window's text may take by default (30 s of fast speech is about 120)
_LANGUAGE = re.compile(r"^[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})?$")
_FIELDS = {"model", "language", "prompt", "response_format", "temperature", "max_tokens"}
_IGNORED = {"timestamp_granularities[]", "timestamp_granularities", "include[]", "chunking_strategy", "stream"}


def body_limit(config: ServeConfig) -> int:
    return max(config.max_body_bytes, config.media.max_bytes + MULTIPART_OVERHEAD)


@dataclass
class Job:
    """A checked transcription request, its recording decoded and windowed."""

    response_format: str
    temperature: float
    max_tokens: int  # per window
    language: str | None
    text: str  # the instruction sent with every window
    samples: torch.Tensor  # 16 kHz mono
    windows: list


def parse_multipart(raw: bytes, content_type: str) -> dict[str, bytes]:
    """Form fields of a multipart/form-data body by name (a file field's content as it came), parsed
    by python-multipart (the parser Starlette uses), from bytes already read under the body limit."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise bad_request("a multipart/form-data body needs a boundary in its Content-Type")
    fields: dict[str, bytes] = {}
    part: dict = {}
    ended = []

    def on_header_field(data, start, end):
        part["field"] = part.get("field", b"") + data[start:end]

    def on_header_value(data, start, end):
        part["value"] = part.get("value", b"") + data[start:end]

    def on_header_end():
        if part.pop("field", b"").lower() == b"content-disposition":
            part["disposition"] = part.get("value", b"")
        part.pop("value", None)

    def on_headers_finished():
        name = parse_options_header(part.get("disposition", b""))[1].get(b"name")
        if name is None:
            raise bad_request("a multipart part has no Content-Disposition name")
        key = name.decode("utf-8", "replace")
        if key in fields:
            raise bad_request(f"the form field {key[:40]!r} is given twice")
        if len(fields) >= MAX_FIELDS:
            raise bad_request(f"more than {MAX_FIELDS} form fields")
        part["key"], part["data"] = key, []

    def on_part_data(data, start, end):
        part["data"].append(data[start:end])

    def on_part_end():
        fields[part["key"]] = b"".join(part["data"])
        part.clear()

    callbacks = {"on_header_field": on_header_field, "on_header_value": on_header_value,
                 "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
                 "on_part_data": on_part_data, "on_part_end": on_part_end, "on_end": lambda: ended.append(True)}
    try:
        parser = MultipartParser(boundary, callbacks, max_header_count=MAX_FIELDS)
        parser.write(raw)
        parser.finalize()
    except MultipartParseError as error:
        raise bad_request(f"the multipart body is malformed: {sanitize(str(error))[:200]}") from None
    if not ended or not fields:
        raise bad_request("the multipart body has no parts, or is not closed by its boundary (truncated?)")
    return fields


def prepare(raw: bytes, content_type: str, served: ServedModel, config: ServeConfig) -> Job:
    """A multipart body -> a Job, or an APIError (blocking: run it in a worker thread)."""
    fields = parse_multipart(raw, content_type)
    text = {k: _text(k, v) for k, v in fields.items() if k != "file"}
    if "model" not in text:
        raise bad_request("the form needs a model field", param="model")
    check_model(text["model"], config)
    if unknown := sorted(set(text) - _FIELDS - _IGNORED):
        log.debug("ignoring unknown transcription fields: %s", unknown[:10])
    if text.get("stream", "false").lower() not in ("false", "0", ""):
        raise bad_request("streamed transcriptions are not supported; leave out stream", param="stream")
    fmt = text.get("response_format") or "json"
    if fmt not in FORMATS:
        raise bad_request(f"response_format must be one of {', '.join(FORMATS)}", param="response_format")
    temperature = _temperature(text.get("temperature"))
    max_tokens = text.get("max_tokens") or str(WINDOW_MAX_TOKENS)
    if not (max_tokens.isascii() and max_tokens.isdigit() and len(max_tokens) < 10
            and 1 <= int(max_tokens) <= served.context):
        raise bad_request(f"max_tokens (per window) must be a whole number from 1 to {served.context}",
                          param="max_tokens")
    language = text.get("language") or None
    if language is not None and not _LANGUAGE.match(language):
        raise bad_request("language must be a language code such as en or pt-BR", param="language")
    prompt = text.get("prompt") or None
    if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
        raise bad_request(f"prompt is over {MAX_PROMPT_CHARS} characters", param="prompt")
    if not served.capabilities["audio"]:
        raise bad_request(NO_AUDIO, param="model")
    data = fields.get("file")
    if data is None:
        raise bad_request("the form needs a file field: the recording", param="file")
    if len(data) > config.media.max_bytes:
        raise bad_request(f"the file is {len(data)} bytes; at most {config.media.max_bytes}", param="file")
    try:
        samples = load_audio(bytes(data))
        windows = plan_windows(samples, RATE)
    except MediaError as error:
        raise bad_request(f"cannot read the audio: {sanitize(str(error))}", param="file") from None
    return Job(fmt, temperature, int(max_tokens), language, instruction(language, prompt), samples, windows)


def _text(name: str, value: bytes) -> str:
    try:
        return value.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise bad_request(f"the form field {name[:40]!r} is not UTF-8 text", param=name[:40]) from None


def _temperature(value: str | None) -> float:
    if value in (None, ""):
        return 0.0
    try:
        t = float(value)
    except ValueError:
        t = math.nan
    if not 0 <= t <= 1:
        raise bad_request("temperature must be a number from 0 to 1", param="temperature")
    return t


def window_request(job: Job, i: int, served: ServedModel) -> GenerationRequest:
    """Window i as the scheduler's request: its chat prompt (special tokens in the user's text kept as
    text), its audio as engine media, and the answer's token budget."""
    w = job.windows[i]
    clip = job.samples[w.start : w.end]
    messages = window_messages(clip, job.text)
    text, literals = served.prompts.render(messages, None, False)
    limit = served.context - 1
    try:
        ids, media = process(text, served, lambda t: served.prompts.encode(t, literals, limit, served.context),
                             audios=[(clip, RATE)])
    except PromptTooLong as error:
        raise context_length_error(ContextLengthError(served.context, error.tokens, 1)) from None
    except MediaError as error:
        raise bad_request(f"cannot read the audio: {sanitize(str(error))}", param="file") from None
    budget = min(job.max_tokens, served.context - len(ids))
    if budget < 1:
        raise context_length_error(ContextLengthError(served.context, len(ids), 1))
    sampling = SamplingParams(temperature=job.temperature)
    return GenerationRequest(ids, budget, sampling, served.stop_ids, logprobs=0, tokenizer=served.tokenizer,
                             media=media)


async def transcribe(request: Request, job: Job, served: ServedModel, config: ServeConfig, stopping) -> Response:
    """Run the job's windows on the server's scheduler and answer in the asked format."""
    gone = threading.Event()
    in_flight = max(1, config.max_batch // 2)
    work = asyncio.ensure_future(asyncio.to_thread(
        run_windows, served.scheduler, lambda i: window_request(job, i, served), len(job.windows),
        in_flight=in_flight, cancelled=gone.is_set))
    try:
        while not work.done():
            await asyncio.wait({work}, timeout=config.poll_interval)
            if not work.done() and await request.is_disconnected():
                gone.set()
        results = work.result()
    except TranscriptionCancelled:
        return Response(status_code=400)  # nobody is there to read it
    except QueueFullError:
        raise APIError(429, "the server is busy: too many queued requests; retry later", retry_after=1) from None
    except SchedulerClosedError:
        raise APIError(503, "the engine is not available", retry_after=5) from None
    except RuntimeError as error:
        if stopping():
            raise APIError(503, "the server is shutting down", retry_after=5) from None
        raise APIError(500, sanitize(str(error))) from None
    finally:
        gone.set()
    fmt = served.format
    transcript = join_windows(job.windows, results, RATE, job.language,
                              clean=lambda t: fmt.parse(t).content.strip())
    out = transcript.render(job.response_format, job.temperature)
    if isinstance(out, dict):
        return JSONResponse(out)
    return PlainTextResponse(out)

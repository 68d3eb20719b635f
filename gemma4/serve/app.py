"""The OpenAI-compatible HTTP app: routes, request checks, streaming, lifecycle.

    POST /v1/chat/completions   POST /v1/completions   POST /v1/audio/transcriptions (transcriptions.py)
    GET /v1/models   GET /health   GET /metrics
    GET /   the chat page (ui/; off with `ui=False`)

A request is checked completely (shape, limits, model id, tools, context length, grammar) before
anything is allocated; what costs CPU in proportion to the body (parsing, validation, the prompt)
runs in a worker thread, so a large body never stalls the event loop, and bodies over `LARGE_BODY`
get a small pool of their own, so a burst of them queues behind itself, not in front of small
requests. Then it is handed to the engine's `Scheduler`, which batches it with the other running
requests. The scheduler thread delivers tokens through a thread-safe callback into
an asyncio queue per request; `OutputAssembler` turns them into deltas for both the streamed
(SSE) and the whole response. A client that goes away cancels its request, which frees its slot
at the scheduler's next step. Errors use OpenAI's body shape (errors.py); after a stream has
started they are sent in-band as `data: {"error": ...}` followed by `data: [DONE]`.

Shutdown (`_State.drain`, called by `cli.Server` before uvicorn closes connections): new requests
and /health get 503, uploads in progress end (503), running requests get `shutdown_timeout`
seconds to finish, and the rest are aborted: a stream ends with an in-band 503 error and
`[DONE]`, a whole response is a 503 body, and one line is logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..chat import ChatFormat
from ..config import ContextLengthError
from ..engine.core import PREFILL_CHUNK
from ..engine.speculative import make_speculation
from ..engine.scheduler import GenerationRequest, QueueFullError, Scheduler, SchedulerClosedError, TokenEvent
from . import checks, transcriptions, ui
from .errors import APIError, context_length_error
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .output import Delta, OutputAssembler, logprob_entry
from .media import MediaPolicy
from .prompts import PromptBuilder
from .security import PUBLIC_PATHS, CORSMiddleware, GateMiddleware, allowed_hosts_for, cors_options, read_body
from .structured import Grammars

log = logging.getLogger(__name__)


PREFIX_CACHE_TOKENS = 8192
LARGE_BODY = 256 * 1024  # bytes; preparing one costs ~50 ms or more of tokenizing


@dataclass
class ServeConfig:
    model_name: str = "gemma4"
    api_key: str | None = None
    host: str = "127.0.0.1"  # the bind address; decides the default Host allowlist
    allowed_hosts: list[str] | None = None
    cors_origins: list[str] | None = None
    max_batch: int = 8  # KV slots: requests decoded together
    max_queue: int = 32  # requests waiting for a slot before 429
    max_tokens_default: int = 1024
    max_model_len: int | None = None  # tokens per slot (prompt + completion); default: the model's context
    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout: float = 30.0  # seconds a client has to send its whole request body (408 after)
    shutdown_timeout: float = 10.0  # seconds running requests get to finish when the server stops
    prefill_chunk: int = PREFILL_CHUNK
    mode: str = "eager"  # the decode step: "eager", "compile", "reduce-overhead" (CUDA graphs)
    compile_options: dict | None = None  # for torch.compile (tests trace with {"backend": "aot_eager"})
    prefix_cache_tokens: int = PREFIX_CACHE_TOKENS  # K/V kept for prompts that start alike; 0 = off
    grammar_timeout: float = 5.0
    # Speculative decoding (docs/speculative.md): "ngram" or a Drafter, or an MTP drafter checkpoint.
    speculative: object | None = None
    draft_model: str | None = None
    draft_tokens: int | None = None  # k; default: the drafter's
    poll_interval: float = 0.25  # how often a non-streaming request checks that its client is still there
    ui: bool = True  # serve the chat page at `/`
    media: MediaPolicy = field(default_factory=MediaPolicy)  # where images and video may come from, limits


class ServedModel:
    """One loaded model with what serving it needs: prompt builder, grammars, scheduler."""

    def __init__(self, model, tokenizer, config: ServeConfig, chat_format: ChatFormat | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.format = chat_format or ChatFormat(model.config.family)
        self.prompts = PromptBuilder(tokenizer, self.format)
        self.vocab = model.config.vocab_size
        self.stop_ids = frozenset(tokenizer.stop_ids)
        ids = {name: tokenizer.token_to_id(s) for name, s in
               dict(open="<|tool_call>", close="<tool_call|>", quote='<|"|>', channel_open="<|channel>",
                    channel_close="<channel|>").items()}
        self.ids = ids
        self.has_tools = self.format.family == "gemma4" and None not in (ids["open"], ids["close"], ids["quote"])
        self.grammars = Grammars(tokenizer, self.vocab, self.stop_ids)
        self.scheduler = Scheduler(model, max_batch=config.max_batch, max_queue=config.max_queue,
                                   max_len=config.max_model_len, prefill_chunk=config.prefill_chunk,
                                   vocab_limit=tokenizer.vocab_size, mode=config.mode,
                                   prefix_cache=config.prefix_cache_tokens, compile_options=config.compile_options,
                                   speculation=make_speculation(model, config.speculative, config.draft_model,
                                                                config.draft_tokens))

    @property
    def context(self) -> int:
        return self.scheduler.max_len

    @property
    def capabilities(self) -> dict:
        """What requests may use, for clients such as the chat page (`/v1/models`)."""
        vision = getattr(self.model, "vision_config", None) is not None
        audio = getattr(self.model, "audio_config", None) is not None
        return {"image": vision, "video": vision and self.format.family == "gemma4", "audio": audio,
                "thinking": self.format.family == "gemma4", "tools": self.has_tools}


@dataclass
class _State:
    config: ServeConfig
    metrics: Metrics
    served: ServedModel | None = None
    status: str = "loading"  # loading | ready | failed | stopping
    started: int = field(default_factory=lambda: int(time.time()))
    uploads: set = field(default_factory=set)  # the asyncio.Timeout of each body being read

    def ready(self) -> ServedModel:
        if self.status == "loading":
            raise APIError(503, "the model is still loading", retry_after=5)
        if self.status == "stopping":
            raise _shutting_down()
        if self.served is None or self.status != "ready" or self.served.scheduler.dead is not None:
            raise APIError(503, "the engine is not available")
        return self.served

    async def drain(self) -> None:
        """Stop taking requests, let the running ones finish for up to `shutdown_timeout` seconds,
        then abort the rest (each still gets its answer: see `_Context`)."""
        self.status = "stopping"
        now = asyncio.get_running_loop().time()
        for upload in list(self.uploads):  # a request still uploading would be refused anyway
            upload.reschedule(now)
        scheduler = self.served.scheduler if self.served is not None else None
        if scheduler is None:
            return
        timeout = self.config.shutdown_timeout
        deadline = time.monotonic() + timeout
        while (busy := _busy(scheduler)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if busy:
            log.warning("shutting down: aborting %d request(s) still running after --shutdown-timeout %gs",
                        _busy(scheduler), timeout)
            await asyncio.to_thread(scheduler.stop)


def _busy(scheduler) -> int:
    stats = scheduler.stats()
    return stats.running + stats.waiting


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", retry_after=5)


ConstraintHook = Callable[[object, list[int]], list]


def build_app(
    model=None,
    tokenizer=None,
    *,
    config: ServeConfig | None = None,
    loader: Callable[[], tuple] | None = None,  # -> (model, tokenizer) or (model, tokenizer, chat format)
    chat_format: ChatFormat | None = None,
    constraint_hook: ConstraintHook | None = None,
) -> FastAPI:
    """The ASGI app serving `model`/`tokenizer`, or what `loader()` returns (loaded in the background
    at startup, while /health answers 503). `constraint_hook(request, prompt_ids)` may add token
    constraints to every request (tests use it to script outputs; see docs/serving.md)."""
    config = config or ServeConfig()
    state = _State(config, Metrics(config.model_name))
    large_bodies = ThreadPoolExecutor(max(1, (os.cpu_count() or 1) // 4), thread_name_prefix="gemma4-large-body")

    def install(m, t, fmt=None) -> None:
        served = ServedModel(m, t, config, fmt or chat_format)
        if config.mode != "eager":
            log.info("tracing the compiled decode step for batch sizes up to %d ...", config.max_batch)
            served.scheduler.warm_up()
        served.scheduler.start()
        state.metrics.scheduler = served.scheduler
        state.served, state.status = served, "ready"

    def load_in_background() -> None:
        try:
            install(*loader())
        except Exception:  # noqa: BLE001 - reported through /health
            log.exception("loading the model failed")
            state.status = "failed"

    @asynccontextmanager
    async def lifespan(app):
        if model is not None:
            install(model, tokenizer)
        elif loader is not None:
            threading.Thread(target=load_in_background, name="gemma4-loader", daemon=True).start()
        yield
        large_bodies.shutdown(wait=False, cancel_futures=True)
        if state.served is not None:
            state.served.scheduler.stop()

    app = FastAPI(title="gemma4", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gemma4 = state
    app.add_middleware(CORSMiddleware, **cors_options(config.cors_origins))
    app.add_middleware(GateMiddleware, api_key=config.api_key,
                       allowed_hosts=allowed_hosts_for(config.host, config.allowed_hosts),
                       public_paths=PUBLIC_PATHS | ui.PATHS if config.ui else PUBLIC_PATHS)
    if config.ui:
        ui.add_routes(app)

    @app.exception_handler(APIError)
    async def _api_error(request, error: APIError):
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, error: StarletteHTTPException):
        message = "not found" if error.status_code == 404 else str(error.detail)
        return APIError(error.status_code, message).response()

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request, error: ClientDisconnect):
        # Normal traffic (a client that gave up mid-upload): one line, no traceback, nobody to answer.
        log.info("%s %s: the client disconnected before sending the whole body", request.method,
                 request.scope["path"])
        return Response(status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request, error: Exception):
        log.exception("unhandled error")
        return APIError(500, "internal server error").response()

    @app.get("/health")
    async def health():
        state.ready()
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        served = state.ready()
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": state.started,
                                            "owned_by": "gemma4", "max_model_len": served.context,
                                            "capabilities": served.capabilities}]}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def body(request: Request, limit: int | None = None, media_type: str = "application/json") -> bytes:
        try:
            return await read_body(request, limit or config.max_body_bytes, config.body_timeout, state.uploads,
                                   media_type)
        except APIError as error:
            if error.status == 408 and state.status == "stopping":  # cut short by `drain`
                raise APIError(503, "the server is shutting down", close=True) from None
            raise

    async def prepare(fn, request: Request, served: ServedModel) -> checks.Prepared:
        raw = await body(request)
        if len(raw) < LARGE_BODY:
            return await asyncio.to_thread(fn, raw, served, config)
        return await asyncio.get_running_loop().run_in_executor(large_bodies, fn, raw, served, config)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        served = state.ready()
        p = await prepare(checks.prepare_chat, request, served)
        req, text = p.req, p.prompt_text
        constraints = await checks.constraints(req, served, p.tools, text, config)
        if constraint_hook is not None:
            constraints += constraint_hook(req, p.ids)
        gen = GenerationRequest(p.ids, p.max_tokens, p.sampling, served.stop_ids,
                                logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                                constraints=constraints, logit_bias=p.logit_bias,
                                stop=req.stop_list, tokenizer=served.tokenizer, media=p.media)
        starts_open = text.rfind("<|channel>") > text.rfind("<channel|>")
        assembler = OutputAssembler(served.tokenizer, served.format.stream_parser(prompt=text),
                                    (served.ids["channel_open"], served.ids["channel_close"]), starts_open)
        return await _run(request, state, req, gen, assembler, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        served = state.ready()
        p = await prepare(checks.prepare_completion, request, served)
        req = p.req
        constraints = constraint_hook(req, p.ids) if constraint_hook is not None else []
        gen = GenerationRequest(p.ids, p.max_tokens, p.sampling, served.stop_ids, logprobs=req.logprobs,
                                constraints=constraints, logit_bias=p.logit_bias,
                                stop=req.stop_list, tokenizer=served.tokenizer)
        assembler = OutputAssembler(served.tokenizer, None)
        return await _run(request, state, req, gen, assembler, chat=False)

    @app.post("/v1/audio/transcriptions")
    async def audio_transcriptions(request: Request):
        served = state.ready()
        raw = await body(request, transcriptions.body_limit(config), "multipart/form-data")
        job = await asyncio.to_thread(transcriptions.prepare, raw, request.headers.get("content-type", ""),
                                      served, config)
        if state.status == "stopping":
            raise _shutting_down()
        return await transcriptions.transcribe(request, job, served, config, lambda: state.status == "stopping")

    return app


# -- running a request ------------------------------------------------------------------------------

async def _run(request: Request, state: _State, req, gen: GenerationRequest, assembler: OutputAssembler,
               *, chat: bool):
    served = state.served
    if state.status == "stopping":  # prepared while `drain` began: the engine takes nothing new
        raise _shutting_down()
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
    try:
        handle = served.scheduler.submit(gen, lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
    except QueueFullError:
        state.metrics.label(state.metrics.rejected).inc()
        raise APIError(429, "the server is busy: too many queued requests; retry later", retry_after=1) from None
    except SchedulerClosedError:
        raise APIError(503, "the engine is not available", retry_after=5) from None
    except ContextLengthError as error:
        raise context_length_error(error) from None
    state.metrics.label(state.metrics.started).inc()
    ctx = _Context(state, req, gen, assembler, handle, queue, chat)
    if req.stream:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        # `close` again after the response: a client gone before the first chunk never runs sse()'s finally.
        return StreamingResponse(ctx.sse(), media_type="text/event-stream", headers=headers,
                                 background=BackgroundTask(ctx.close))
    return await ctx.whole(request)


class _Context:
    """One running request: pulls its events, builds chunks or the whole response, records metrics."""

    def __init__(self, state, req, gen, assembler, handle, queue, chat):
        self.state, self.req, self.gen, self.out, self.handle, self.queue, self.chat = (
            state, req, gen, assembler, handle, queue, chat)
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.times: list[float] = []
        self.error: str | None = None
        self.pending_logprobs: list[TokenEvent] = []
        self.done = False

    async def next(self) -> list[Delta]:
        event = await self.queue.get()
        if event.token is not None:
            self.times.append(event.time)
            if self.gen.logprobs is not None:
                self.pending_logprobs.append(event)
        if event.finish_reason == "error":
            self.error = event.error or "the engine failed"
        deltas = self.out.feed(event)
        if self.out.finish_reason is not None:
            self.done = True
            self.state.metrics.finished(self.handle, self.out.finish_reason, self.times)
        return deltas

    def close(self) -> None:
        """The client is gone (or the response failed): stop generating at the next step."""
        if not self.done:
            self.done = True
            self.handle.cancel()
            self.state.metrics.finished(self.handle, "abort", self.times)

    def usage(self) -> dict:
        prompt, completion = len(self.gen.prompt), len(self.out.tokens)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        if self.chat:
            usage["prompt_tokens_details"] = {"cached_tokens": self.handle.cached_tokens}
            usage["completion_tokens_details"] = {"reasoning_tokens": self.out.reasoning_tokens}
        return usage

    def take_logprobs(self):
        events, self.pending_logprobs = self.pending_logprobs, []
        if self.gen.logprobs is None or not events:
            return None
        tok = self.out.tokenizer
        if self.chat:
            return {"content": [logprob_entry(tok, e) for e in events]}
        tokens = [tok.decode([e.token]) for e in events]
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in events],
                "top_logprobs": [{tok.decode([t]): lp for t, lp in e.top_logprobs} for e in events],
                "text_offset": [0] * len(events)}

    # -- streaming --------------------------------------------------------------------------------
    def chunk(self, delta: dict | None, finish: str | None = None, text: str = "", logprobs=None,
              usage=None, choices=True) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.req.model}
        if choices:
            choice = {"index": 0}
            if self.chat:
                choice["delta"] = delta or {}
            else:
                choice["text"] = text
            choice.update(logprobs=logprobs, finish_reason=finish)
            body["choices"] = [choice]
        else:
            body["choices"] = []
        if self.req.stream_options and self.req.stream_options.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def sse(self):
        try:
            if self.chat:
                yield self.chunk({"role": "assistant", "content": ""})
            while not self.done:
                deltas = await self.next()
                if self.error is not None:
                    error = APIError(500, self.error).body()
                    yield f"data: {json.dumps(error)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                for d in deltas:
                    if self.chat:
                        yield self.chunk(_delta_dict(d), logprobs=self.take_logprobs())
                    else:
                        yield self.chunk(None, text=d.text, logprobs=self.take_logprobs())
            if self.out.finish_reason == "abort":  # the server aborted it (shutdown): say so in-band
                yield f"data: {json.dumps(_shutting_down().body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            yield self.chunk({}, finish=self.out.finish_reason, logprobs=self.take_logprobs())
            if self.req.stream_options and self.req.stream_options.include_usage:
                yield self.chunk(None, usage=self.usage(), choices=False)
            yield "data: [DONE]\n\n"
        finally:
            self.close()

    # -- whole response ---------------------------------------------------------------------------
    async def whole(self, request: Request) -> JSONResponse:
        deltas: list[Delta] = []
        logprobs = []
        poll = self.state.config.poll_interval
        checked = time.monotonic()
        try:
            while not self.done:
                try:
                    deltas += await asyncio.wait_for(self.next(), poll)
                except asyncio.TimeoutError:
                    pass
                if time.monotonic() - checked >= poll:  # however fast tokens come, look for a gone client
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        break
                if self.gen.logprobs is not None and (lp := self.take_logprobs()):
                    logprobs.append(lp)
        finally:
            self.close()
        if self.error is not None:
            raise APIError(500, self.error)
        if self.out.finish_reason == "abort":  # a client that is gone reads nothing; else: shutdown
            raise _shutting_down()
        body = {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.req.model, "usage": self.usage()}
        merged = _merge_logprobs(logprobs, self.chat) if self.gen.logprobs is not None else None
        if self.chat:
            content = "".join(d.text for d in deltas if d.kind == "content")
            reasoning = "".join(d.text for d in deltas if d.kind == "reasoning")
            calls = [d.call for d in deltas if d.kind == "tool_call"]
            message = {"role": "assistant", "content": content if content or not calls else None}
            if reasoning:
                message["reasoning_content"] = message["reasoning"] = reasoning
            if calls:
                message["tool_calls"] = calls
            choice = {"index": 0, "message": message}
        else:
            choice = {"index": 0, "text": "".join(d.text for d in deltas)}
        choice.update(logprobs=merged, finish_reason=self.out.finish_reason)
        body["choices"] = [choice]
        return JSONResponse(body)


def _delta_dict(d: Delta) -> dict:
    if d.kind == "reasoning":
        return {"reasoning": d.text, "reasoning_content": d.text}
    if d.kind == "tool_call":
        return {"tool_calls": [{"index": d.index, **d.call}]}
    return {"content": d.text}


def _merge_logprobs(parts: list[dict], chat: bool):
    if chat:
        return {"content": [item for p in parts for item in p["content"]]}
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for p in parts:
        for key in merged:
            merged[key] += p[key]
    return merged

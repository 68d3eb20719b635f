"""`gemma4 serve`: flags, model loading and the uvicorn server.

Every flag has a `GEMMA4_*` environment twin (the flag wins); the API key is read from
`--api-key` or `GEMMA4_API_KEY` and never printed. The server binds 127.0.0.1 unless told
otherwise, and uvicorn's limits bound header sizes and keep-alive. `Server` drains the app before
uvicorn's own shutdown (see app.py): left to itself, uvicorn cancels the requests still running
after its graceful timeout, which cuts streams without a word and answers a plain-text 500.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

import uvicorn

from ..engine.speculative import check_options
from ..helptext import RawHelpFormatter
from .app import PREFIX_CACHE_TOKENS, ServeConfig, build_app
from .media import MediaPolicy

log = logging.getLogger(__name__)

DESCRIPTION = """\
Serve a model over an OpenAI-compatible HTTP API: /v1/chat/completions and /v1/completions
(streaming, tools, structured output), /v1/audio/transcriptions (audio models, any length),
/v1/models, /health, /metrics, and a chat page at /
(off with --no-ui). Requests are batched together on one decode engine. Every flag has a
GEMMA4_* environment twin (e.g. GEMMA4_PORT); the flag wins. See docs/serving.md."""

EPILOG = """\
examples:
  gemma4 serve --port 8000                                   # the embedded gemma-3-270m (a base model)
  gemma4 serve --model google/gemma-3-270m-it --api-key KEY  # an instruction-tuned model for chat
  curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'"""

WARNING_HEADER = "x-gemma4-warning"
BASE_MODEL_HEADER = "base model: it continues text and was not trained to chat; use an instruction-tuned checkpoint"


def parser() -> argparse.ArgumentParser:
    return add_serve_arguments(argparse.ArgumentParser(
        prog="gemma4 serve", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=RawHelpFormatter))


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    env = os.environ.get
    p = parser.add_argument
    p("--model", default=env("GEMMA4_MODEL"),
      help="checkpoint directory, .gguf file or Hub id; checked at start (a wrong one exits with its error); "
           "none: the embedded gemma-3-270m, a base model (see its warning)")
    p("--served-model-name", default=env("GEMMA4_SERVED_MODEL_NAME"), help="model id clients send; none: --model")
    p("--host", default=env("GEMMA4_HOST", "127.0.0.1"), help="bind address")
    p("--port", type=int, default=int(env("GEMMA4_PORT", "8000")), help="TCP port (0: any free port)")
    p("--api-key", default=env("GEMMA4_API_KEY"), help="require 'Authorization: Bearer KEY' (env GEMMA4_API_KEY)")
    p("--max-batch", type=int, default=int(env("GEMMA4_MAX_BATCH", "8")), help="requests decoded together (KV slots)")
    p("--max-queue", type=int, default=int(env("GEMMA4_MAX_QUEUE", "32")), help="waiting requests before 429")
    p("--max-tokens-default", type=int, default=int(env("GEMMA4_MAX_TOKENS_DEFAULT", "1024")),
      help="completion length when a request gives none")
    p("--max-model-len", type=int, default=int(env("GEMMA4_MAX_MODEL_LEN", "0")) or None,
      help="tokens per sequence, prompt included; none: the model's context")
    p("--cors-origins", default=env("GEMMA4_CORS_ORIGINS"),
      help="comma-separated allowed browser origins; none: local pages only")
    p("--allowed-hosts", default=env("GEMMA4_ALLOWED_HOSTS"),
      help="comma-separated extra Host header names to accept; none: local names when bound locally")
    p("--adapter", default=env("GEMMA4_ADAPTER"), metavar="DIR",
      help="a LoRA adapter directory (gemma4 finetune's or PEFT's), merged into float weights on load "
           "(kept unmerged over quantized ones)")
    p("--quantize", choices=["int8", "int4"], default=env("GEMMA4_QUANTIZE"),
      help="quantize a float or GGUF --model while loading it (int4: groups of 64): less memory, some quality lost")
    p("--dtype", default=env("GEMMA4_DTYPE", "auto"), help="auto, float32, bfloat16 or float16")
    p("--exact", action="store_true", default=env("GEMMA4_EXACT", "") not in ("", "0"),
      help="on CPU, keep every weight in float32 (env GEMMA4_EXACT=1). By default a float32 CPU model serves "
           "~2x faster with fp16 linear weights (fp32 math) and an int8 LM head whose 64 best candidates are "
           "recomputed exactly (as `gemma4 generate`): greedy output is unchanged")
    p("--device", default=env("GEMMA4_DEVICE"), help="torch device, e.g. cpu, cuda, cuda:1; none: cpu")
    p("--threads", type=int, default=int(env("GEMMA4_THREADS", "0")) or None,
      help="torch intra-op threads; none: torch's choice (1 can be faster on a shared, busy CPU)")
    p("--compile", action="store_true", default=env("GEMMA4_COMPILE", "") not in ("", "0"),
      help="decode with a torch.compile'd step (CUDA graphs on a GPU), traced for each batch size at "
           "startup: faster steps after a slow start (env GEMMA4_COMPILE=1)")
    p("--prefix-cache-tokens", type=int, default=int(env("GEMMA4_PREFIX_CACHE_TOKENS", str(PREFIX_CACHE_TOKENS))),
      help="K/V of this many prompt tokens are kept for requests that start the same way (a system prompt, "
           "a chat's history); 0 turns prefix reuse off")
    p("--speculative", choices=["ngram"], default=env("GEMMA4_SPECULATIVE"),
      help="speculative decoding by prompt lookup (n-gram drafts), for any model: faster on copy-heavy work, "
           "same output (docs/speculative.md)")
    p("--draft-model", default=env("GEMMA4_DRAFT_MODEL"), metavar="PATH",
      help="speculative decoding with a Gemma 4 MTP drafter (an -it-assistant checkpoint) for --model")
    p("--draft-tokens", type=int, default=int(env("GEMMA4_DRAFT_TOKENS", "0")) or None, metavar="K",
      help="tokens drafted per step, 1 to 32 (default: the drafter's own; adapted down when drafts fail)")
    p("--max-body-bytes", type=int, default=int(env("GEMMA4_MAX_BODY_BYTES", str(4 * 1024 * 1024))),
      help="larger request bodies get 413, refused by Content-Length or as soon as the count passes it")
    p("--body-timeout", type=float, default=float(env("GEMMA4_BODY_TIMEOUT", "30")),
      help="seconds a client has to send its whole request body; slower uploads get 408")
    p("--shutdown-timeout", type=float, default=float(env("GEMMA4_SHUTDOWN_TIMEOUT", "10")),
      help="seconds to let running requests finish on SIGTERM; the rest end with a 503 error")
    p("--no-ui", action="store_true", default=env("GEMMA4_NO_UI", "") not in ("", "0"),
      help="do not serve the chat page at / (env GEMMA4_NO_UI=1); the API is unchanged")
    p("--text-only", action="store_true", default=env("GEMMA4_TEXT_ONLY", "") not in ("", "0"),
      help="leave out a multimodal checkpoint's vision and audio towers: less memory, and media are refused")
    p("--allowed-media-dir", default=env("GEMMA4_ALLOWED_MEDIA_DIR"), metavar="DIR",
      help="let image_url / video_url parts name files (paths or file:// URLs) inside DIR; by default only "
           "data: URLs are read")
    p("--allow-remote-media", action="store_true", default=env("GEMMA4_ALLOW_REMOTE_MEDIA", "") not in ("", "0"),
      help="let image_url / video_url parts be http(s) URLs, fetched by the server (20 MB, 10 s each)")
    p("--max-media-items", type=int, default=int(env("GEMMA4_MAX_MEDIA_ITEMS", "16")),
      help="images, videos and audio clips one request may carry")
    from ..parallel.args import add_parallel_arguments

    add_parallel_arguments(parser)
    return parser


def load_checkpoint(path, dtype=None, device=None, adapter: str | None = None,
                    quantize: str | None = None, exact: bool = False, text_only: bool = False, layout=None):
    """(model, tokenizer, chat format) from a checkpoint directory, .gguf file, Hub id or opened
    `Checkpoint` (`gemma4.load`),
    with an unmerged LoRA adapter when `adapter` names one, quantized while loading when `quantize`
    says "int8" or "int4", and with the CPU fast path (`gemma4.engine.cpu.speed_up`) unless `exact`."""
    from ..api import load
    from ..engine.cpu import speed_up

    model, tokenizer, chat_format = load(path, dtype=dtype, device=device, adapter=adapter, quantize=quantize,
                                         text_only=text_only, layout=layout)
    if not exact:
        speed_up(model)  # CPU float32 only; a no-op elsewhere
    return model, tokenizer, chat_format


FLUSH_SECONDS = 5.0  # after the drain: for the last responses to reach their clients before uvicorn cancels


class Server(uvicorn.Server):
    """uvicorn's server; on shutdown the app (`app.state.gemma4`) drains first, while connections
    are still open, so every request still running gets its answer."""

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:
            server.close()  # no new connections while draining
        state = getattr(getattr(self.config.app, "state", None), "gemma4", None)
        if state is not None:
            await state.drain()
        await super().shutdown(sockets)


def serve_cli(args: argparse.Namespace | list[str] | None = None) -> int:
    """Run the server until interrupted (the lead wires this to `gemma4 serve`)."""
    if not isinstance(args, argparse.Namespace):
        args = parser().parse_args(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # a wrong --model or --device fails here, with the loader's message, not as a server answering 503
        check_options(args.speculative, args.draft_model, args.draft_tokens)  # flags first: cheaper still
        from ..parallel.run import start

        layout = start(args)  # --tp: join the group; None on one process
        ckpt = open_model(args.model, args.device)
    except (ValueError, OSError) as error:  # CheckpointError is a ValueError
        print(f"gemma4 serve: error: {error}", file=sys.stderr)
        return 1
    if layout is not None:
        from .parallel import serve_rank

        return serve_rank(layout, ckpt, args, lambda: _serve(args, ckpt, layout))
    return _serve(args, ckpt, None)


def _serve(args, ckpt, layout) -> int:
    from ..api import base_model_warning

    warning = base_model_warning(ckpt)
    if warning:
        log.warning("%s", warning)
    config = ServeConfig(
        model_name=args.served_model_name or args.model or "gemma-3-270m",
        api_key=args.api_key or None,
        host=args.host,
        allowed_hosts=_split(args.allowed_hosts),
        cors_origins=_split(args.cors_origins),
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_tokens_default=args.max_tokens_default,
        max_model_len=args.max_model_len,
        max_body_bytes=args.max_body_bytes,
        body_timeout=args.body_timeout,
        shutdown_timeout=args.shutdown_timeout,
        mode=_compile_mode(args),
        prefix_cache_tokens=args.prefix_cache_tokens,
        ui=not args.no_ui,
        speculative=args.speculative,
        draft_model=args.draft_model,
        draft_tokens=args.draft_tokens,
        media=MediaPolicy(max_items=args.max_media_items, allow_remote=args.allow_remote_media,
                          allowed_dir=Path(args.allowed_media_dir) if args.allowed_media_dir else None),
    )
    shown = {k: v for k, v in vars(config).items() if k != "api_key"} | {"api_key": "***" if config.api_key else None}
    log.info("serving with %s", shown)
    if config.ui:  # port 0: uvicorn's line below names the port it got
        page = f"http://{_url_host(args.host)}:{args.port}/" if args.port else "/"
        log.info("chat page: %s (--no-ui turns it off)", page)
    # uvicorn re-raises the signal that stopped it once it has shut down; a handler that ignores it
    # lets a drained server exit with status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    failed = []

    def loader():
        try:
            return load_checkpoint(ckpt, dtype=args.dtype, device=args.device, adapter=args.adapter,
                                   quantize=args.quantize, exact=args.exact, text_only=args.text_only,
                                   layout=layout)
        except Exception:
            failed.append(True)  # logged by the app; a server with no model stops rather than answer 503
            server.should_exit = True
            raise

    app = build_app(config=config, loader=loader)
    if warning:
        app.add_middleware(WarningHeader, value=BASE_MODEL_HEADER)
    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info", timeout_keep_alive=15,
                                   timeout_graceful_shutdown=FLUSH_SECONDS, h11_max_incomplete_event_size=64 * 1024))
    server.run()
    if failed:
        return 1
    return 0 if server.started else 3  # 3: uvicorn's exit status for a server that could not start


def open_model(model: str | None, device: str | None):
    """The checkpoint opened (config and tensor headers only), after checking the device."""
    from ..api import check_device, default_model_path
    from ..weights import open_checkpoint
    from ..weights.hub import resolve

    check_device(device)
    return open_checkpoint(resolve(model) if model else default_model_path())


class WarningHeader:
    """ASGI middleware: an `x-gemma4-warning` header on every chat completion (a base model's)."""

    def __init__(self, app, value: str):
        self.app, self.value = app, value.encode("latin-1")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            return await self.app(scope, receive, send)

        async def with_header(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), (WARNING_HEADER.encode(), self.value)])
            await send(message)

        await self.app(scope, receive, with_header)


def _compile_mode(args) -> str:
    if not args.compile:
        return "eager"
    device = args.device or ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    return "reduce-overhead" if str(device).startswith("cuda") else "compile"


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _split(value: str | None) -> list[str] | None:
    items = [v.strip() for v in (value or "").split(",") if v.strip()]
    return items or None

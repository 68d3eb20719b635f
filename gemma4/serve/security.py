"""Request gatekeeping: Host allowlist, API key, CORS, reading the body and parsing it.

- `GateMiddleware` (pure ASGI, outermost): refuses a foreign or malformed `Host` header with 403
  (DNS rebinding: a page on evil.example resolving to 127.0.0.1 must not reach a local server), then
  demands the API key on every path except an explicit public allowlist (`/health`, and the chat
  page's files when it is on). The decision is
  made on `scope["path"]` as the server received it, default-deny: `//v1/...`, `/v1/../v1/...`,
  encoded slashes and unknown routes all need the key. Keys are compared in constant time,
  case-sensitive. CORS preflights (OPTIONS with Origin and Access-Control-Request-Method) pass to
  the CORS middleware inside, which answers them without reaching a route.
- `CORSMiddleware`: Starlette's, local origins only unless configured, never `*` with credentials;
  a refused preflight is answered with OpenAI's error body like every other refusal.
- `read_body` (on the event loop, cheap): a Content-Length over the cap is refused before anything
  is read (413), the bytes are counted while the body streams in and reading stops at the cap
  (413), and the whole body must arrive within `timeout` seconds (408), so half-open uploads do
  not hold connections forever. A client that disconnects mid-upload raises Starlette's
  `ClientDisconnect`, which the app logs as one line: it is normal traffic.
- `parse_json` (in a worker thread: its cost grows with the body): UTF-8, one JSON object, no
  NaN/Infinity literals, nested at most `MAX_DEPTH` levels (400).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import re

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware as _StarletteCORS
from starlette.requests import Request
from starlette.responses import Response

from .errors import APIError, bad_request

PUBLIC_PATHS = frozenset({"/health"})
LOCAL_ORIGIN_REGEX = r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?$"
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
_HOST = re.compile(r"^(?:\[([0-9a-f:.]+)\]|([^:\[\]@/\\\s]+))(?::\d{1,5})?$")
# Deeper than any real request (a response_format schema may have 32 levels, two JSON levels each):
# a deeper body is refused before recursive code (pydantic, the prompt builder, templates) walks it.
MAX_DEPTH = 128


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts_for(bind_host: str, extra: list[str] | None = None) -> frozenset[str] | None:
    """Host names accepted in the Host header; None = any (bound to a public address, no list given)."""
    if extra:
        return frozenset([*_LOCAL_HOSTS, *extra])
    if is_loopback(bind_host):
        return frozenset(_LOCAL_HOSTS)
    return None


def _host_name(header: str) -> str | None:
    """`example.com:8000` -> `example.com`; `[::1]:8000` -> `::1`; None when it is no `host[:port]`
    (`localhost:80@evil.example`, `[::1]evil`)."""
    match = _HOST.match(header)
    return (match.group(1) or match.group(2)) if match else None


class GateMiddleware:
    def __init__(self, app, *, api_key: str | None, allowed_hosts: frozenset[str] | None,
                 public_paths: frozenset[str] = PUBLIC_PATHS):
        self.app = app
        self.public_paths = public_paths
        self.api_key = api_key.encode() if api_key else None
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for key, value in scope["headers"]:
            headers.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
        if self.allowed_hosts is not None:
            host = _host_name(headers.get("host", "").strip().lower())
            if host not in self.allowed_hosts:
                return await APIError(403, "Host header not allowed").response()(scope, receive, send)
        preflight = (scope["method"] == "OPTIONS" and "origin" in headers
                     and "access-control-request-method" in headers)
        if self.api_key is not None and scope["path"] not in self.public_paths and not preflight:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key):
                error = APIError(401, "Invalid or missing API key; send 'Authorization: Bearer <key>'.")
                response = error.response()
                response.headers["WWW-Authenticate"] = "Bearer"
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class CORSMiddleware(_StarletteCORS):
    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        refused = APIError(response.status_code, bytes(response.body).decode()).response()  # "Disallowed CORS origin"
        for key, value in response.headers.items():
            if key not in ("content-length", "content-type"):
                refused.headers[key] = value
        return refused


def cors_options(origins: list[str] | None) -> dict:
    """Arguments for `CORSMiddleware`: the given origins, else local pages only."""
    common = dict(allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["Authorization", "Content-Type"],
                  allow_credentials=False)
    if origins:
        return dict(allow_origins=origins, **common)
    return dict(allow_origin_regex=LOCAL_ORIGIN_REGEX, **common)


async def read_body(request: Request, limit: int, timeout: float, uploads: set | None = None,
                    media_type: str = "application/json") -> bytes:
    """The raw body, or an APIError: 413 over `limit` bytes, 400 not of `media_type` by its Content-Type,
    408 not all there after `timeout` seconds. `uploads`, if given, holds the running read's
    `asyncio.Timeout` meanwhile, so shutdown can end it early (`Timeout.reschedule`)."""
    too_large = APIError(413, f"request body too large (limit {limit} bytes)")  # uvicorn discards the rest
    length = request.headers.get("content-length")
    if length is not None and not (length.isascii() and length.isdigit() and int(length) <= limit):
        raise too_large
    ctype = request.headers.get("content-type", "")
    if not re.match(rf"^{re.escape(media_type)}\s*(;|$)", ctype, re.I):
        raise bad_request(f"Content-Type must be {media_type}")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout) as deadline:
            if uploads is not None:
                uploads.add(deadline)
            try:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise too_large
                    chunks.append(chunk)
            finally:
                if uploads is not None:
                    uploads.discard(deadline)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s", close=True) from None
    return b"".join(chunks)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> dict:
    """`raw` as a JSON object, or a 400 APIError."""
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise bad_request("the request body is not valid UTF-8") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply") from None
    except ValueError as error:  # json.JSONDecodeError's text names only a line and column
        raise bad_request(f"the request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, not {type(body).__name__}")
    if deeper_than(body, MAX_DEPTH):
        raise bad_request(f"the request body is nested too deeply (more than {MAX_DEPTH} levels)")
    return body


def deeper_than(value, limit: int) -> bool:
    """Whether JSON-like `value` nests dicts and lists more than `limit` levels deep."""
    stack = [(value, 1)]  # iterative: the check must not itself recurse
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False

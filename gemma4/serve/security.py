"""Request gatekeeping: Host allowlist, API key, body size, JSON parsing.

- `GateMiddleware` (pure ASGI, outermost): refuses a foreign `Host` header with 403 (DNS rebinding:
  a page on evil.example resolving to 127.0.0.1 must not reach a local server), then demands the
  API key on every path except an explicit public allowlist (`/health`). The decision is made on
  `scope["path"]` as the server received it, default-deny: `//v1/...`, `/v1/../v1/...`, encoded
  slashes and unknown routes all need the key. Keys are compared in constant time, case-sensitive.
  CORS preflights (OPTIONS with an Origin) pass to the CORS middleware inside, which answers them.
- `cors_options`: local origins only unless configured; never `*` with credentials.
- `read_json`: the body, capped by Content-Length and while streaming (413), must be
  `application/json`, UTF-8, one JSON object, without NaN/Infinity literals (400).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re

from starlette.requests import Request

from .errors import APIError, bad_request

PUBLIC_PATHS = frozenset({"/health"})
LOCAL_ORIGIN_REGEX = r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?$"
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


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


def _host_name(header: str) -> str:
    """`example.com:8000` -> `example.com`; `[::1]:8000` -> `::1`."""
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class GateMiddleware:
    def __init__(self, app, *, api_key: str | None, allowed_hosts: frozenset[str] | None):
        self.app = app
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
        preflight = scope["method"] == "OPTIONS" and "origin" in headers
        if self.api_key is not None and scope["path"] not in PUBLIC_PATHS and not preflight:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key):
                error = APIError(401, "Invalid or missing API key; send 'Authorization: Bearer <key>'.")
                response = error.response()
                response.headers["WWW-Authenticate"] = "Bearer"
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def cors_options(origins: list[str] | None) -> dict:
    """Arguments for Starlette's CORSMiddleware: the given origins, else local pages only."""
    common = dict(allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["Authorization", "Content-Type"],
                  allow_credentials=False)
    if origins:
        return dict(allow_origins=origins, **common)
    return dict(allow_origin_regex=LOCAL_ORIGIN_REGEX, **common)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, limit: int) -> dict:
    """The request body as a JSON object, or an APIError (413 / 415-as-400 / 400)."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise APIError(413, f"request body too large (limit {limit} bytes)")
    ctype = request.headers.get("content-type", "")
    if not re.match(r"^application/json\s*(;|$)", ctype, re.I):
        raise bad_request("Content-Type must be application/json")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body too large (limit {limit} bytes)")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks).decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise bad_request("the request body is not valid UTF-8") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply") from None
    except ValueError as error:  # json.JSONDecodeError's text names only a line and column
        raise bad_request(f"the request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, not {type(body).__name__}")
    return body

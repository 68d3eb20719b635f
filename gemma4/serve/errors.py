"""OpenAI-style error bodies: `{"error": {"message", "type", "param", "code"}}` with the right status.

Every failure the server reports goes through `APIError`, so clients (the OpenAI SDK, LiteLLM) map
it to their exception types: 400 invalid_request_error, 401 authentication_error, 403
permission_error, 404 not_found_error, 408 body too slow, 413 body too large (both
invalid_request_error), 429 rate_limit_error (queue full, with Retry-After), 500 server_error, 503
service_unavailable (loading, engine down, shutting down). Messages never carry internal reprs.
"""

from __future__ import annotations

import re

from pydantic import ValidationError
from starlette.responses import JSONResponse

from ..config import ContextLengthError

_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
    415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable",
}
_UNION_TAG = re.compile(r"[\[\]\-]|^(str|int|float|bool|dict|list|none)$")


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after
        self.close = close  # end the connection after answering (a body left unread cannot be skipped)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
        if self.close:
            headers["Connection"] = "close"
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def context_length_error(error: ContextLengthError) -> APIError:
    """The engine's one context message (vLLM's wording, by which LiteLLM and other clients detect
    an overflow) as OpenAI's 400 `context_length_exceeded`."""
    return APIError(400, str(error), param="messages", code="context_length_exceeded")


def prompt_too_long(context: int, at_least: int, completion: int) -> APIError:
    """The same 400 for a prompt that overflows by its length in characters alone: its exact token
    count was never computed, so the message gives a lower bound."""
    return APIError(400, f"This model's maximum context length is {context} tokens. However, your messages are at "
                         f"least {at_least} tokens long, and {completion} more are requested for the completion. "
                         "Please reduce the length of the messages or completion.",
                    param="messages", code="context_length_exceeded")


def from_validation(error: ValidationError) -> APIError:
    """The most telling pydantic error as a 400 naming the offending parameter."""
    errors = sorted(error.errors(include_url=False), key=lambda e: e["type"].endswith("_type"))
    first = errors[0]
    loc = [str(part) for part in first["loc"] if not _UNION_TAG.search(str(part))]
    param = ".".join(loc) or None
    message = first["msg"].removeprefix("Value error, ")
    return bad_request(f"{param}: {message}" if param else message, param=param)


def sanitize(text: str) -> str:
    """Drop memory addresses and file paths from an exception's text before a client sees it."""
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", text)
    return re.sub(r"(/[\w.\-]+){2,}", "<path>", text)[:500]

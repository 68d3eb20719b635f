"""Gemma 4 tool syntax: the JSON-like value language of tool calls and tool responses.

Values are written as the reference chat template's `format_argument` macro writes them:
strings between `<|"|>` delimiters (unescaped), numbers as Python prints them, `true`/`false`,
null as `None` (the template prints Python's None; the parser also accepts `null`), objects
`{key:value,...}` with bare keys sorted case-insensitively (Jinja's `dictsort`), lists `[a,b]`.
Because strings are not escaped, a string containing `<|"|>` (or, inside a call, the text
`<tool_call|>`) cannot be represented; everything else round-trips.

Parsing never raises: a malformed or truncated call becomes a `ToolCallError` carrying the raw
text, so a server can report it instead of crashing on the model's output.
"""

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from .tokens import STRING_DELIM, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, TOOL_RESPONSE_CLOSE, TOOL_RESPONSE_OPEN


@dataclass(frozen=True)
class ToolCall:
    """A parsed call: the function name and its arguments as plain JSON values."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ToolCallError:
    """A call that could not be parsed: what went wrong and the text as the model wrote it."""

    message: str
    raw: str


def dictsort(mapping: Mapping) -> list[tuple[Any, Any]]:
    """Items ordered like Jinja's `dictsort`: by key, case-insensitively, stable on ties."""
    for key in mapping:
        if not isinstance(key, str):
            raise TypeError(f"tool syntax needs string keys, got {key!r}")
    return sorted(mapping.items(), key=lambda item: item[0].lower())


def format_value(value: Any, *, escape_keys: bool = False) -> str:
    """Write one value in tool syntax (`escape_keys` quotes object keys, as declarations do)."""
    if isinstance(value, str):
        return STRING_DELIM + value + STRING_DELIM
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        items = []
        for key, item in dictsort(value):
            key_text = STRING_DELIM + key + STRING_DELIM if escape_keys else key
            items.append(key_text + ":" + format_value(item, escape_keys=escape_keys))
        return "{" + ",".join(items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(item, escape_keys=escape_keys) for item in value) + "]"
    if value is None:
        return "None"
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"tool syntax has no spelling for {value!r}")
    if isinstance(value, (int, float)):
        return str(value)
    raise TypeError(f"cannot write a {type(value).__name__} in tool syntax: {value!r}")


def encode_tool_call(name: str, arguments: Mapping[str, Any]) -> str:
    """`<|tool_call>call:NAME{key:value,...}<tool_call|>`, as the template renders history."""
    _check_name(name)
    if not isinstance(arguments, Mapping):
        raise TypeError(f"tool call arguments must be a mapping, got {type(arguments).__name__}")
    return f"{TOOL_CALL_OPEN}call:{name}{format_value(arguments)}{TOOL_CALL_CLOSE}"


def encode_tool_response(name: str, result: Any) -> str:
    """`<|tool_response>response:NAME{...}<tool_response|>`; a non-mapping result becomes `{value:...}`."""
    _check_name(name)
    body = format_value(result) if isinstance(result, Mapping) else "{value:" + format_value(result) + "}"
    return f"{TOOL_RESPONSE_OPEN}response:{name}{body}{TOOL_RESPONSE_CLOSE}"


TOOL_NAME = re.compile(r"[^\s{}\[\]():,<>|\"']+")  # what may stand between `call:` and `{`
_BARE_KEY = re.compile(r"[^\s:,{}\[\]<]+")
_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_LITERALS = {"true": True, "false": False, "null": None, "None": None}
_LITERAL = re.compile(r"true|false|null|None")
_MAX_DEPTH = 100


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise ValueError(f"not a usable tool name: {name!r}")


def parse_tool_call(text: str) -> ToolCall | ToolCallError:
    """Parse `call:NAME{...}`, with or without the surrounding `<|tool_call>` markers."""
    body = text.strip()
    if body.startswith(TOOL_CALL_OPEN):
        if not body.endswith(TOOL_CALL_CLOSE):
            return ToolCallError(f"truncated tool call: no closing {TOOL_CALL_CLOSE}", text)
        body = body[len(TOOL_CALL_OPEN) : -len(TOOL_CALL_CLOSE)].strip()
    if not body.startswith("call:"):
        return ToolCallError("a tool call must start with 'call:'", text)
    brace = body.find("{")
    name = body[len("call:") : brace].strip() if brace != -1 else ""
    if brace == -1:
        return ToolCallError("truncated tool call: no '{' after the name", text)
    if not TOOL_NAME.fullmatch(name):
        return ToolCallError(f"bad tool name {name!r}", text)
    parser = _Parser(body, brace)
    try:
        arguments = parser.object(depth=0)
        parser.skip_space()
        if parser.pos != len(body):
            parser.fail("unexpected text after the arguments")
    except _SyntaxError as error:
        return ToolCallError(str(error), text)
    return ToolCall(name, arguments)


def parse_tool_calls(text: str) -> list[ToolCall | ToolCallError]:
    """Every `<|tool_call>...<tool_call|>` block in `text`, in order; an unclosed last one is an error."""
    calls: list[ToolCall | ToolCallError] = []
    start = text.find(TOOL_CALL_OPEN)
    while start != -1:
        end = text.find(TOOL_CALL_CLOSE, start)
        if end == -1:
            calls.append(ToolCallError(f"truncated tool call: no closing {TOOL_CALL_CLOSE}", text[start:]))
            break
        end += len(TOOL_CALL_CLOSE)
        calls.append(parse_tool_call(text[start:end]))
        start = text.find(TOOL_CALL_OPEN, end)
    return calls


class _SyntaxError(Exception):
    pass


class _Parser:
    """Recursive descent over one call body; whitespace between tokens is tolerated."""

    def __init__(self, text: str, pos: int):
        self.text, self.pos = text, pos

    def fail(self, message: str) -> NoReturn:
        near = self.text[self.pos : self.pos + 20]
        where = f"near {near!r}" if near else "at the end of the text (truncated?)"
        raise _SyntaxError(f"{message} at offset {self.pos}, {where}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos : self.pos + 1]

    def value(self, depth: int) -> Any:
        char = self.peek()
        if self.text.startswith(STRING_DELIM, self.pos):
            return self.string()
        if char == "{":
            return self.object(depth + 1)
        if char == "[":
            return self.array(depth + 1)
        if match := _LITERAL.match(self.text, self.pos):
            self.pos = match.end()
            return _LITERALS[match.group()]
        if match := _NUMBER.match(self.text, self.pos):
            return self.number(match)
        self.fail("expected a value")

    def number(self, match: re.Match) -> int | float:
        token = match.group()
        try:
            number = int(token) if token.lstrip("-").isdigit() else float(token)
        except ValueError:  # more digits than int() accepts
            self.fail("number too long")
        if isinstance(number, float) and not math.isfinite(number):
            self.fail("number out of range")
        self.pos = match.end()
        return number

    def string(self) -> str:
        start = self.pos + len(STRING_DELIM)
        end = self.text.find(STRING_DELIM, start)
        if end == -1:
            self.fail(f"unterminated string (no closing {STRING_DELIM})")
        self.pos = end + len(STRING_DELIM)
        return self.text[start:end]

    def key(self) -> str:
        self.skip_space()
        if self.text.startswith(STRING_DELIM, self.pos):
            return self.string()
        match = _BARE_KEY.match(self.text, self.pos)
        if not match:
            self.fail("expected a key")
        self.pos = match.end()
        return match.group()

    def object(self, depth: int) -> dict[str, Any]:
        self.enter("{", depth)
        result: dict[str, Any] = {}
        if self.peek() == "}":
            self.pos += 1
            return result
        while True:
            key = self.key()
            if self.peek() != ":":
                self.fail(f"expected ':' after key {key!r}")
            self.pos += 1
            result[key] = self.value(depth)
            if self.close_or_comma("}"):
                return result

    def array(self, depth: int) -> list[Any]:
        self.enter("[", depth)
        result: list[Any] = []
        if self.peek() == "]":
            self.pos += 1
            return result
        while True:
            result.append(self.value(depth))
            if self.close_or_comma("]"):
                return result

    def enter(self, opener: str, depth: int) -> None:
        if depth > _MAX_DEPTH:
            self.fail("values nested too deeply")
        self.skip_space()
        self.pos += len(opener)

    def close_or_comma(self, closer: str) -> bool:
        char = self.peek()
        if char not in (",", closer):
            self.fail(f"expected ',' or '{closer}'")
        self.pos += 1
        return char == closer

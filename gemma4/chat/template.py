"""Render a checkpoint's own chat template in a Jinja sandbox, the way Hugging Face does.

Templates change between checkpoint revisions, so the checkpoint's `chat_template.jinja` (or the
`chat_template` of `tokenizer_config.json` / `chat_template.json`) is the reference for its prompts.
Templates are untrusted code: they run in `ImmutableSandboxedEnvironment` with what HF templates
are written against (`trim_blocks`, `lstrip_blocks`, loop controls, `{% generation %}` blocks,
`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text) and see only plain JSON
data. Beyond Jinja's sandbox, touching an unsafe attribute fails at once (Jinja would quietly
render it empty), repeating a sequence or raising to a power is capped, and a render may produce
at most MAX_OUTPUT characters in at most MAX_SECONDS (checked as it writes and in every `range`
loop), so a template can exhaust neither memory nor time. Every failure, at load or at render,
is a `ChatTemplateError` naming the problem.
"""

import json
import time
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateError, TemplateSyntaxError, nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

from .tokens import BOS, EOS

_MAX_REPEAT = 1_000_000  # items a `*` may produce
_MAX_POWER_BITS = 1_000_000  # size of an integer `**` result
MAX_OUTPUT = 8_000_000  # characters a render may produce (a long context's prompt is a few MB)
MAX_SECONDS = 5.0  # a render's time (the built-in Gemma templates take milliseconds)
_DEADLINE: ContextVar[float] = ContextVar("chat_template_deadline", default=float("inf"))


class ChatTemplateError(Exception):
    """A chat template that cannot be loaded or rendered."""


class _Raised(TemplateError):
    """What the template's own `raise_exception(...)` throws."""


class _GenerationBlocks(Extension):
    """`{% generation %}...{% endgeneration %}` (HF's mark for assistant text): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is unsafe")

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int) and len(seq) * count > _MAX_REPEAT:
                    raise SecurityError(f"repetition would build {len(seq) * count} items")
        elif isinstance(left, int) and isinstance(right, int) and left.bit_length() * right > _MAX_POWER_BITS:
            raise SecurityError(f"{left} ** {right} is too large")
        return super().call_binop(context, operator, left, right)


class _TimedRange(Sequence):
    """`range(...)` for templates: Jinja's capped range whose iteration checks the render's deadline,
    so nested loops that write nothing still stop in time."""

    def __init__(self, *args):
        self._range = safe_range(*args)

    def __len__(self):
        return len(self._range)

    def __getitem__(self, index):
        return self._range[index]

    def __iter__(self):
        deadline = _DEADLINE.get()
        for i, value in enumerate(self._range):
            if not i % 1024 and time.monotonic() > deadline:
                raise SecurityError(f"the render took more than {MAX_SECONDS:g} s")
            yield value


def _raise_exception(message):
    raise _Raised(str(message))


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationBlocks])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["range"] = _TimedRange
    return env


class ChatTemplate:
    """A compiled chat template plus the special-token strings it is rendered with."""

    def __init__(self, source: str, *, name: str = "chat template", bos_token: str = BOS, eos_token: str = EOS):
        self.source, self.name = source, name
        self.bos_token, self.eos_token = bos_token, eos_token
        try:
            self._template = _environment().from_string(source)
        except TemplateSyntaxError as error:
            raise ChatTemplateError(f"{name}: syntax error on line {error.lineno}: {error.message}") from error

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        add_generation_prompt: bool = True,
        enable_thinking: bool = False,
        **variables: Any,
    ) -> str:
        """The prompt text; extra `variables` (e.g. `documents`) are passed to the template."""
        if isinstance(messages, (str, Mapping)) or not all(isinstance(m, Mapping) for m in messages):
            raise ChatTemplateError(f"{self.name}: messages must be a list of dicts")
        context = {
            **plain_data(variables),
            "messages": plain_data(list(messages)),
            "tools": plain_data(tools),
            "add_generation_prompt": add_generation_prompt,
            "enable_thinking": enable_thinking,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        deadline = time.monotonic() + MAX_SECONDS
        token = _DEADLINE.set(deadline)
        try:
            return self._bounded(self._template.generate(context), deadline)
        except _Raised as error:
            raise ChatTemplateError(f"{self.name} rejected the conversation: {error}") from error
        except SecurityError as error:
            raise ChatTemplateError(f"{self.name} tried an unsafe operation: {error}") from error
        except TemplateError as error:
            raise ChatTemplateError(f"{self.name} failed: {error}") from error
        except Exception as error:  # TypeError, RecursionError, ... from template expressions
            raise ChatTemplateError(f"{self.name} failed: {type(error).__name__}: {error}") from error
        finally:
            _DEADLINE.reset(token)

    def _bounded(self, pieces, deadline: float) -> str:
        """The rendered text, stopped past MAX_OUTPUT characters or the deadline."""
        out, size = [], 0
        for piece in pieces:
            size += len(piece)
            if size > MAX_OUTPUT:
                raise SecurityError(f"the render grew past {MAX_OUTPUT:,} characters")
            if time.monotonic() > deadline:
                raise SecurityError(f"the render took more than {MAX_SECONDS:g} s")
            out.append(piece)
        return "".join(out)


def plain_data(value: Any) -> Any:
    """A copy built from JSON types only, so the sandbox never sees callers' rich objects.

    Anything else (an image, bytes, an array) becomes a placeholder string naming its type:
    templates test media parts for presence, never read their payload.
    """
    if value is None or type(value) in (str, int, float, bool):  # bool cannot be subclassed
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_data(key): plain_data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(item) for item in value]
    return f"<{type(value).__name__}>"


def load_chat_template(checkpoint: str | Path) -> ChatTemplate | None:
    """The checkpoint directory's template, or None when it ships none.

    Looks at `chat_template.jinja`, then `tokenizer_config.json` (`chat_template`, a string or a
    list of named templates, of which `default` is used), then `chat_template.json`. The special
    tokens come from `tokenizer_config.json` when it names them.
    """
    root = Path(checkpoint)
    config = _read_json(root / "tokenizer_config.json")
    tokens = {key: _token_text(config.get(key), default) for key, default in (("bos_token", BOS), ("eos_token", EOS))}
    if (path := root / "chat_template.jinja").is_file():
        return ChatTemplate(path.read_text(encoding="utf-8"), name=str(path), **tokens)
    for path in (root / "tokenizer_config.json", root / "chat_template.json"):
        source = _read_json(path).get("chat_template")
        if isinstance(source, list):
            named = {entry.get("name"): entry.get("template") for entry in source if isinstance(entry, Mapping)}
            source = named.get("default")
        if isinstance(source, str):
            return ChatTemplate(source, name=f"{path} chat_template", **tokens)
        if source is not None:
            raise ChatTemplateError(f"{path}: chat_template must be a string or a list with a 'default' entry")
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ChatTemplateError(f"cannot read {path}: {error}") from error
    if not isinstance(data, dict):
        raise ChatTemplateError(f"{path} must hold a JSON object")
    return data


def _token_text(token: Any, default: str) -> str:
    """A special token as written in tokenizer_config.json: a string or `{"content": ...}`."""
    if isinstance(token, Mapping):
        token = token.get("content")
    return token if isinstance(token, str) else default

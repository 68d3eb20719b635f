"""Built-in Gemma 4 prompt renderer: the reference `chat_template.jinja` rewritten in Python.

Used when a checkpoint ships no template. It reproduces the stored reference revision
(tests/data/gemma4_chat_template.jinja; origin in tests/data/README.md) byte for byte:
- `<bos>`, then a system turn if thinking is on, tools are given, or the first message is
  system/developer: `<|turn>system\n`, `<|think|>\n` when thinking, the trimmed system text,
  one `<|tool>declaration:...<tool|>` per tool, `<turn|>\n`;
- each message as `<|turn>{role}\n{trimmed content}<turn|>\n`, assistant rendered as `model`,
  thought blocks stripped from model text, media parts as `<|image|>`/`<|audio|>`/`<|video|>`;
- an assistant message with `tool_calls` writes `<|tool_call>call:...<tool_call|>` blocks followed
  by one `<|tool_response>response:...<tool_response|>` per following `role: tool` message, and the
  model turn stays open for the next assistant message; a call with no response yet ends the
  prompt with a bare `<|tool_response>`;
- reasoning (`reasoning`/`reasoning_content`) is kept only on tool-calling turns after the last
  user message, as `<|channel>thought\n...\n<channel|>`.
The generation prompt is `<|turn>model\n`. The 12B/26B/31B templates (the stored one among them)
add an empty thought block `<|channel>thought\n<channel|>` when thinking is off; the E2B/E4B ones do
not (priming them that way leaks reasoning), hence `empty_thought_when_not_thinking`.
"""

from collections.abc import Mapping, Sequence
from typing import Any

from . import _jinja as j
from .declaration import format_declaration
from .tokens import (
    AUDIO, BOS, CHANNEL_CLOSE, CHANNEL_OPEN, IMAGE, THINK, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, TOOL_CLOSE,
    TOOL_OPEN, TOOL_RESPONSE_CLOSE, TOOL_RESPONSE_OPEN, TURN_CLOSE, TURN_OPEN, VIDEO,
)
from .tool_syntax import dictsort, format_value

ROLES = ("system", "developer", "user", "assistant", "tool")
_MEDIA = {"image": IMAGE, "audio": AUDIO, "video": VIDEO}
EMPTY_THOUGHT = CHANNEL_OPEN + "thought\n" + CHANNEL_CLOSE


def render_gemma4(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    enable_thinking: bool = False,
    add_generation_prompt: bool = True,
    empty_thought_when_not_thinking: bool = False,
    bos_token: str = BOS,
) -> str:
    """The prompt text for `messages` (OpenAI-style dicts) and `tools` (already in OpenAI form)."""
    _check_messages(messages)
    out = [bos_token]
    last_type = None  # the template's `ns.prev_message_type`: decides how the prompt ends
    rest = list(messages)
    if enable_thinking or tools or messages[0]["role"] in ("system", "developer"):
        out.append(TURN_OPEN + "system\n")
        if enable_thinking:
            out.append(THINK + "\n")
            last_type = "think"
        if messages[0]["role"] in ("system", "developer"):
            out.append(_system_text(messages[0].get("content")))
            rest = rest[1:]
        if tools:
            out.extend(TOOL_OPEN + format_declaration(tool) + TOOL_CLOSE for tool in tools)
            last_type = "tool"
        out.append(TURN_CLOSE + "\n")
    last_user = max((i for i, message in enumerate(rest) if message["role"] == "user"), default=-1)
    for index, message in enumerate(rest):
        if message["role"] != "tool":  # tool messages are written by the assistant message they answer
            text, last_type = _render_message(rest, index, last_user)
            out.append(text)
    if add_generation_prompt and last_type not in ("tool_response", "tool_call"):
        out.append(TURN_OPEN + "model\n")
        if empty_thought_when_not_thinking and not enable_thinking:
            out.append(EMPTY_THOUGHT)
    return "".join(out)


def _render_message(messages: list, index: int, last_user: int) -> tuple[str, str | None]:
    """One non-tool message and the tool responses that follow it; returns (text, last type)."""
    message = messages[index]
    role = "model" if message["role"] == "assistant" else message["role"]
    last_type = None
    out = []
    previous = next((m["role"] for m in reversed(messages[:index]) if m["role"] != "tool"), None)
    if not (role == "model" and previous == "assistant"):  # else: continue the open model turn
        out.append(TURN_OPEN + role + "\n")
    thinking = message.get("reasoning") or message.get("reasoning_content")
    tool_calls = message.get("tool_calls")
    if thinking and index > last_user and tool_calls:
        out.append(CHANNEL_OPEN + "thought\n" + thinking + "\n" + CHANNEL_CLOSE)
    if tool_calls:
        out.extend(_format_call(call["function"]) for call in tool_calls)
        last_type = "tool_call"
    responded = False
    if message.get("tool_responses"):  # Google's native form: responses carried on the message
        for response in message["tool_responses"]:
            out.append(_response_block(response.get("name", "unknown"), response["response"]))
            responded, last_type = True, "tool_response"
    elif tool_calls:
        for follow in messages[index + 1 :]:
            if follow["role"] != "tool":
                break
            out.append(_tool_message_block(follow, tool_calls))
            responded, last_type = True, "tool_response"
    content, media_type = _content_text(message.get("content"), model=role == "model")
    out.append(content)
    last_type = media_type or last_type
    if last_type == "tool_call" and not responded:
        out.append(TOOL_RESPONSE_OPEN)  # the host's response comes next
    elif not (responded and not content.strip()):
        out.append(TURN_CLOSE + "\n")
    return "".join(out), last_type


def _format_call(function: Mapping[str, Any]) -> str:
    arguments = function.get("arguments")
    if isinstance(arguments, Mapping):
        body = ",".join(key + ":" + format_value(value) for key, value in dictsort(arguments))
    else:  # the template pastes a pre-serialized string as is
        body = arguments if isinstance(arguments, str) else ""
    return TOOL_CALL_OPEN + "call:" + function["name"] + "{" + body + "}" + TOOL_CALL_CLOSE


def _tool_message_block(follow: Mapping[str, Any], tool_calls: Sequence[Mapping[str, Any]]) -> str:
    """A `role: tool` message, named after the call whose `id` its `tool_call_id` matches."""
    name = follow.get("name")
    for call in tool_calls:
        if call.get("id") == follow.get("tool_call_id"):  # as in the template, the last match wins
            name = call["function"]["name"]
    body = follow.get("content")
    if isinstance(body, Mapping):
        raise ValueError("the reference template cannot render a mapping as tool message content; pass a string")
    if isinstance(body, (list, tuple)):
        parts = _parts(body)
        text = "".join(part.get("text", "") for part in parts if part.get("type") == "text")
        media = "".join(_MEDIA.get(part.get("type"), "") for part in parts)
        return _response_block(name, text) + media
    return _response_block(name, body)


def _response_block(name: Any, response: Any) -> str:
    if not isinstance(name, str):
        raise ValueError("a tool response needs a tool name: give the tool message a 'name' or a "
                         "'tool_call_id' matching one of the calls")
    body = format_value(response) if isinstance(response, Mapping) else "{value:" + format_value(response) + "}"
    return TOOL_RESPONSE_OPEN + "response:" + name + body + TOOL_RESPONSE_CLOSE


def _content_text(content: Any, *, model: bool) -> tuple[str, str | None]:
    """Message content as the template writes it, and the last media type seen (if any)."""
    clean = strip_thinking if model else str.strip
    if content is None:
        return "", None
    if isinstance(content, str):
        return clean(content), None
    out, media_type = [], None
    for part in _parts(content):
        kind = part.get("type")
        if kind == "text":
            out.append(clean(part.get("text", "")))
        elif kind in _MEDIA:
            out.append(_MEDIA[kind])
            media_type = kind
    return "".join(out), media_type


def _system_text(content: Any) -> str:
    if isinstance(content, str):
        return content.strip()
    if content is None:
        return ""
    return "".join(j.text(j.get(part, "text")).strip() + " " for part in _parts(content))


def strip_thinking(text: str) -> str:
    """Model text without `<|channel>...<channel|>` thought blocks, trimmed (the template's macro)."""
    kept = (part.split(CHANNEL_OPEN)[0] for part in text.split(CHANNEL_CLOSE))
    return "".join(kept).strip()


def _parts(content: Any) -> list[Mapping[str, Any]]:
    if not isinstance(content, (list, tuple)) or not all(isinstance(part, Mapping) for part in content):
        raise TypeError(f"message content must be a string or a list of parts (dicts), got {content!r:.80}")
    return list(content)


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    if not messages:
        raise ValueError("a prompt needs at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("role") not in ROLES:
            raise ValueError(f"message {i} must be a dict with a role among {ROLES}, got {message!r:.80}")
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, Mapping) else None
            if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
                raise ValueError(f"message {i}: each tool call needs a 'function' with a 'name', got {call!r:.80}")

"""Built-in Gemma 3 prompt renderer, matching the Gemma 3 instruction models' chat template.

Gemma 3 has no system role, thinking or tool syntax: a leading system message is prepended to the
first user turn followed by a blank line, turns must alternate user/model, and each turn is
`<start_of_turn>{role}\n{trimmed content}<end_of_turn>\n` (image parts become `<start_of_image>`).
The stored reference is tests/data/gemma3_chat_template.jinja.
"""

from collections.abc import Mapping, Sequence
from typing import Any

from .tokens import BOS, END_OF_TURN, START_OF_IMAGE, START_OF_TURN


def render_gemma3(
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = BOS,
) -> str:
    """The prompt text for `messages` (OpenAI-style dicts)."""
    if not messages or not all(isinstance(m, Mapping) and isinstance(m.get("role"), str) for m in messages):
        raise ValueError("a prompt needs at least one message, each a dict with a 'role'")
    prefix, rest = "", list(messages)
    if messages[0]["role"] == "system":
        prefix, rest = _system_prefix(messages[0].get("content")), rest[1:]
    out = [bos_token]
    for index, message in enumerate(rest):
        if (message["role"] == "user") != (index % 2 == 0):
            raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")
        role = "model" if message["role"] == "assistant" else message["role"]
        out.append(START_OF_TURN + role + "\n" + (prefix if index == 0 else ""))
        out.append(_content_text(message))
        out.append(END_OF_TURN + "\n")
    if add_generation_prompt:
        out.append(START_OF_TURN + "model\n")
    return "".join(out)


def _system_prefix(content: Any) -> str:
    """The system text (untrimmed, as the template has it) and a blank line."""
    if isinstance(content, str):
        return content + "\n\n"
    if isinstance(content, (list, tuple)) and content and isinstance(content[0], Mapping):
        return str(content[0].get("text", "")) + "\n\n"
    raise ValueError(f"system message content must be a string or a list of text parts, got {content!r:.80}")


def _content_text(message: Mapping[str, Any]) -> str:
    content = message.get("content", [])
    if isinstance(content, str):
        return content.strip()
    if not isinstance(content, (list, tuple)) or not all(isinstance(part, Mapping) for part in content):
        raise ValueError(f"Invalid content type: {content!r:.80}")
    out = []
    for part in content:
        if part.get("type") == "image":
            out.append(START_OF_IMAGE)
        elif part.get("type") == "text":
            out.append(part.get("text", "").strip())
    return "".join(out)

"""`ChatFormat`: one family's prompt format, the single object the engine, CLI and server use.

It renders conversations with the checkpoint's own template when there is one (exact parity with
the reference stack) and with the built-in renderer of the family otherwise, parses generated text
back into content, reasoning and tool calls, and knows the ids that end a turn. Before rendering,
inputs are brought to the shape templates expect: tools in OpenAI function form, OpenAI's JSON-string
tool-call arguments decoded to objects (templates would paste the string verbatim), and OpenAI's
`image_url` / `video_url` / `input_audio` content parts renamed to the `image` / `video` / `audio` parts templates know.
"""

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .gemma3_prompt import render_gemma3
from .gemma4_prompt import render_gemma4
from .output import GEMMA3_OUTPUT, GEMMA4_OUTPUT, ParsedTurn, StreamParser, parse_output
from .template import ChatTemplate, load_chat_template
from .tokens import CHANNEL_CLOSE, CHANNEL_OPEN, GEMMA3_SPECIAL_TOKEN_IDS, GEMMA4_SPECIAL_TOKEN_IDS, STOP_TOKEN_IDS
from .tools import normalize_tools

FAMILIES = ("gemma4", "gemma3")
_PART_TYPES = {"image_url": "image", "video_url": "video", "input_audio": "audio"}


@dataclass(frozen=True)
class ChatFormat:
    """The chat format of a family (`"gemma4"` or `"gemma3"`), optionally with a checkpoint template.

    `empty_thought_when_not_thinking` only affects the built-in Gemma 4 renderer: set it for
    12B/26B/31B checkpoints, whose templates prime non-thinking answers with an empty thought block.
    """

    family: str
    template: ChatTemplate | None = None
    empty_thought_when_not_thinking: bool = False

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown chat family {self.family!r}; expected one of {FAMILIES}")

    @classmethod
    def for_checkpoint(cls, family: str, checkpoint: str | Path, **options: Any) -> "ChatFormat":
        """The family's format using the template the checkpoint directory ships, if any."""
        return cls(family, load_chat_template(checkpoint), **options)

    @property
    def stop_token_ids(self) -> frozenset[int]:
        return STOP_TOKEN_IDS[self.family]

    @property
    def special_token_ids(self) -> dict[str, int]:
        return GEMMA4_SPECIAL_TOKEN_IDS if self.family == "gemma4" else GEMMA3_SPECIAL_TOKEN_IDS

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Any] | None = None,
        enable_thinking: bool = False,
        add_generation_prompt: bool = True,
    ) -> str:
        """The prompt text (it starts with `<bos>`: tokenize it without adding another)."""
        tools = normalize_tools(tools)
        messages = normalize_messages(messages)
        if self.template is not None:
            return self.template.render(
                messages, tools, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking
            )
        if self.family == "gemma3":
            if tools or enable_thinking:
                raise ValueError("Gemma 3 has no tool-call syntax and no thinking mode")
            return render_gemma3(messages, add_generation_prompt=add_generation_prompt)
        return render_gemma4(
            messages,
            tools,
            enable_thinking=enable_thinking,
            add_generation_prompt=add_generation_prompt,
            empty_thought_when_not_thinking=self.empty_thought_when_not_thinking,
        )

    def parse(self, text: str, *, prompt: str = "") -> ParsedTurn:
        """Split generated text; pass the `prompt` when it may end inside an open thought block."""
        return parse_output(text, self._output_syntax, in_thought=self._opens_thought(prompt))

    def stream_parser(self, *, prompt: str = "") -> StreamParser:
        return StreamParser(self._output_syntax, in_thought=self._opens_thought(prompt))

    @property
    def _output_syntax(self):
        return GEMMA4_OUTPUT if self.family == "gemma4" else GEMMA3_OUTPUT

    def _opens_thought(self, prompt: str) -> bool:
        """Newer Gemma 4 templates end some prompts with `<|channel>thought\\n` left open."""
        return self.family == "gemma4" and prompt.rfind(CHANNEL_OPEN) > prompt.rfind(CHANNEL_CLOSE)


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the messages in the shape chat templates read (see the module docstring)."""
    if isinstance(messages, (str, Mapping)):
        raise ValueError("messages must be a list of dicts")
    result = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {index} must be a dict, got {type(message).__name__}")
        message = dict(message)
        if isinstance(message.get("content"), (list, tuple)):
            message["content"] = [_normalize_part(part) for part in message["content"]]
        if isinstance(message.get("tool_calls"), (list, tuple)):
            message["tool_calls"] = [_normalize_call(call) for call in message["tool_calls"]]
        result.append(message)
    return result


def _normalize_part(part: Any) -> Any:
    if isinstance(part, Mapping) and part.get("type") in _PART_TYPES:
        return {**part, "type": _PART_TYPES[part["type"]]}
    return part


def _normalize_call(call: Any) -> Any:
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except json.JSONDecodeError:
        return call  # not JSON: left for the template to paste as written
    if not isinstance(arguments, dict):
        return call
    return {**call, "function": {**function, "arguments": arguments}}

"""Split a model turn's generated text into thoughts, answer and tool calls, whole or streamed.

Gemma 4 output, special tokens kept, looks like
    <|channel>thought\n...reasoning...<channel|>the answer<turn|>
    <|tool_call>call:f{a:1}<tool_call|><|tool_call>call:g{}<tool_call|><|tool_response>
`StreamParser` takes text pieces as they are decoded and returns `ThoughtDelta`, `ContentDelta` and
`ToolCallComplete` events. It never emits part of a marker: a tail that could still grow into one
(`<|chan`) is held back until the next piece decides. Whitespace at the start and end of the
answer and of the reasoning is dropped (trailing whitespace is held back until more text follows),
so the deltas add up to exactly what `parse_output` returns for the whole text, however the text
was cut. `<turn|>` and `<eos>` end the turn; `<|tool_response>...<tool_response|>` blocks (written
by the host) are skipped. Gemma 3 has no thoughts or tools: everything before `<end_of_turn>` is
the answer.
"""

from dataclasses import dataclass, field

from .tokens import (
    CHANNEL_CLOSE, CHANNEL_OPEN, END_OF_TURN, EOS, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, TOOL_RESPONSE_CLOSE,
    TOOL_RESPONSE_OPEN, TURN_CLOSE,
)
from .tool_syntax import ToolCall, ToolCallError, parse_tool_call


@dataclass(frozen=True)
class ThoughtDelta:
    text: str


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallComplete:
    call: ToolCall | ToolCallError


StreamEvent = ThoughtDelta | ContentDelta | ToolCallComplete


@dataclass
class ParsedTurn:
    """A model turn split up: the answer, the reasoning, and the calls (parsed or failed)."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_errors: list[ToolCallError] = field(default_factory=list)

    def add(self, event: StreamEvent) -> None:
        if isinstance(event, ContentDelta):
            self.content += event.text
        elif isinstance(event, ThoughtDelta):
            self.reasoning += event.text
        elif isinstance(event.call, ToolCall):
            self.tool_calls.append(event.call)
        else:
            self.tool_call_errors.append(event.call)


@dataclass(frozen=True)
class OutputSyntax:
    """The markers of one family's output; None where the family lacks the feature."""

    end: tuple[str, ...]
    channel: tuple[str, str] | None = None
    tool_call: tuple[str, str] | None = None
    skipped: tuple[str, str] | None = None  # blocks the host writes into the turn


GEMMA4_OUTPUT = OutputSyntax(
    end=(TURN_CLOSE, EOS),
    channel=(CHANNEL_OPEN, CHANNEL_CLOSE),
    tool_call=(TOOL_CALL_OPEN, TOOL_CALL_CLOSE),
    skipped=(TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE),
)
GEMMA3_OUTPUT = OutputSyntax(end=(END_OF_TURN, EOS))
_THOUGHT_HEADER = "thought\n"  # the channel name line after `<|channel>`


class _Trimmed:
    """Appends pieces of one text field, dropping its leading and (held-back) trailing whitespace."""

    def __init__(self):
        self.started, self.pending = False, ""

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        body = text.rstrip()
        if not body:
            self.pending += text
            return ""
        out, self.pending = self.pending + body, text[len(body) :]
        return out


class StreamParser:
    """Incremental splitter: `feed(piece)` and finally `finish()`, each returning new events.

    `in_thought` starts inside a thought block, for prompts that end with an open `<|channel>`.
    """

    def __init__(self, syntax: OutputSyntax = GEMMA4_OUTPUT, *, in_thought: bool = False):
        self.syntax = syntax
        self._state = "thought" if in_thought else "content"
        self._header_pending = in_thought
        self._buffer = self._call = ""
        self._content, self._reasoning = _Trimmed(), _Trimmed()
        content = list(syntax.end)
        for pair in (syntax.channel, syntax.tool_call, syntax.skipped):
            if pair:
                content.append(pair[0])
        self._markers = {
            "content": tuple(content),
            "thought": (syntax.channel[1], *syntax.end) if syntax.channel else syntax.end,
            "call": (syntax.tool_call[1], *syntax.end) if syntax.tool_call else syntax.end,
            "skip": (syntax.skipped[1], *syntax.end) if syntax.skipped else syntax.end,
        }

    def feed(self, piece: str) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        self._buffer += piece
        while self._state != "done" and self._step(events):
            pass
        if self._state == "done":
            self._buffer = ""
        return events

    def finish(self) -> list[StreamEvent]:
        """Flush held-back text; an unclosed tool call becomes a `ToolCallError`."""
        events: list[StreamEvent] = []
        text, self._buffer = self._buffer, ""
        if self._state == "thought" and self._header_pending and _THOUGHT_HEADER.startswith(text):
            text = ""
        if self._state == "call":
            self._call += text
            events.append(self._truncated_call())
        elif self._state in ("content", "thought"):
            self._consume(text, events)
        self._state = "done"
        return events

    def _step(self, events: list[StreamEvent]) -> bool:
        """Process the buffer up to the next marker; True if one was consumed (so look again)."""
        if self._state == "thought" and self._header_pending:
            if self._buffer.startswith(_THOUGHT_HEADER):
                self._buffer = self._buffer[len(_THOUGHT_HEADER) :]
            elif _THOUGHT_HEADER.startswith(self._buffer):
                return False  # too little text yet to tell
            self._header_pending = False
        markers = self._markers[self._state]
        found = [(index, marker) for marker in markers if (index := self._buffer.find(marker)) != -1]
        if not found:
            keep = _partial_marker_length(self._buffer, markers)
            text, self._buffer = self._buffer[: len(self._buffer) - keep], self._buffer[len(self._buffer) - keep :]
            self._consume(text, events)
            return False
        index, marker = min(found)
        self._consume(self._buffer[:index], events)
        self._buffer = self._buffer[index + len(marker) :]
        self._on_marker(marker, events)
        return True

    def _consume(self, text: str, events: list[StreamEvent]) -> None:
        if self._state == "content":
            if out := self._content.push(text):
                events.append(ContentDelta(out))
        elif self._state == "thought":
            if out := self._reasoning.push(text):
                events.append(ThoughtDelta(out))
        elif self._state == "call":
            self._call += text

    def _on_marker(self, marker: str, events: list[StreamEvent]) -> None:
        syntax = self.syntax
        if marker in syntax.end:
            if self._state == "call":
                events.append(self._truncated_call())
            self._state = "done"
        elif self._state == "content":
            if syntax.channel and marker == syntax.channel[0]:
                self._state, self._header_pending = "thought", True
            elif syntax.tool_call and marker == syntax.tool_call[0]:
                self._state, self._call = "call", ""
            else:
                self._state = "skip"
        elif self._state == "call":
            open_marker, close_marker = syntax.tool_call
            events.append(ToolCallComplete(parse_tool_call(open_marker + self._call + close_marker)))
            self._state = "content"
        else:  # the end of a thought or of a skipped block
            self._state = "content"


    def _truncated_call(self) -> ToolCallComplete:
        open_marker, close_marker = self.syntax.tool_call
        error = ToolCallError(f"truncated tool call: no closing {close_marker}", open_marker + self._call)
        return ToolCallComplete(error)


def _partial_marker_length(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a marker."""
    for length in range(min(len(text), max(map(len, markers)) - 1), 0, -1):
        tail = text[-length:]
        if any(marker.startswith(tail) for marker in markers):
            return length
    return 0


def parse_output(text: str, syntax: OutputSyntax = GEMMA4_OUTPUT, *, in_thought: bool = False) -> ParsedTurn:
    """The whole generated text of a turn, split up (same rules as streaming it)."""
    parser = StreamParser(syntax, in_thought=in_thought)
    turn = ParsedTurn()
    for event in parser.feed(text) + parser.finish():
        turn.add(event)
    return turn

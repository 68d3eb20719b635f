"""Generated tokens -> OpenAI deltas: split thoughts / answer / tool calls.

One `OutputAssembler` per request turns each `TokenEvent` of the scheduler into a list of
`Delta`s (reasoning text, content text, or one complete tool call), so the streaming and the
non-streaming responses come from the same code and always agree. The engine has already
detokenized the event and cut stop strings (stop tokens are not text); a malformed or truncated
tool call is returned as content, never as a broken call.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from ..chat import ContentDelta, StreamParser, ThoughtDelta, ToolCall, ToolCallComplete
from ..engine.sequence import TokenEvent


@dataclass
class Delta:
    kind: str  # "content" | "reasoning" | "tool_call"
    text: str = ""
    call: dict | None = None  # {"id", "type", "function": {"name", "arguments"}} with arguments a JSON string
    index: int = 0  # of the tool call


@dataclass
class OutputAssembler:
    tokenizer: object
    parser: StreamParser | None  # None: raw text (completions)
    channel_ids: tuple[int | None, int | None] = (None, None)
    starts_in_thought: bool = False
    tokens: list[int] = field(default_factory=list)
    reasoning_tokens: int = 0
    finish_reason: str | None = None
    tool_calls: int = 0

    def __post_init__(self):
        self._in_thought = self.starts_in_thought

    def feed(self, event: TokenEvent) -> list[Delta]:
        """Deltas for one scheduler event; sets `finish_reason` on the last one."""
        if self.finish_reason is not None:
            return []
        if event.token is not None:
            self.tokens.append(event.token)
            self._count_thought(event.token)
        ending = event.finish_reason is not None
        deltas = self._parse(event.text, ending)
        if ending:
            reason = event.finish_reason
            if reason == "stop" and self.tool_calls:
                reason = "tool_calls"
            self.finish_reason = reason
        return deltas

    def _count_thought(self, token: int) -> None:
        open_id, close_id = self.channel_ids
        if token == open_id:
            self._in_thought = True
        elif token == close_id:
            self._in_thought = False
        elif self._in_thought:
            self.reasoning_tokens += 1

    def _parse(self, text: str, ending: bool) -> list[Delta]:
        if self.parser is None:
            return [Delta("content", text)] if text else []
        events = self.parser.feed(text) if text else []
        if ending:
            events += self.parser.finish()
        out = []
        for e in events:
            if isinstance(e, ThoughtDelta):
                out.append(Delta("reasoning", e.text))
            elif isinstance(e, ContentDelta):
                out.append(Delta("content", e.text))
            elif isinstance(e, ToolCallComplete) and isinstance(e.call, ToolCall):
                call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                        "function": {"name": e.call.name, "arguments": json.dumps(e.call.arguments)}}
                out.append(Delta("tool_call", call=call, index=self.tool_calls))
                self.tool_calls += 1
            elif isinstance(e, ToolCallComplete):  # malformed or truncated: give the raw text back
                out.append(Delta("content", e.call.raw))
        return out


def logprob_entry(tokenizer, event: TokenEvent) -> dict:
    """One chat `logprobs.content` item."""

    def item(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode("utf-8"))}

    entry = item(event.token, event.logprob)
    entry["top_logprobs"] = [item(t, lp) for t, lp in event.top_logprobs]
    return entry

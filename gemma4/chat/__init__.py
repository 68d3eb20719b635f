"""Prompt formats of Gemma 4 and Gemma 3: rendering, thought/tool-call parsing, tool syntax.

Strings and JSON values only: nothing here imports torch or the model. `ChatFormat` is the entry
point for the engine, CLI and server; the pieces it is built from are exported for tests and tools.
"""

from .format import FAMILIES, ChatFormat, normalize_messages
from .gemma3_prompt import render_gemma3
from .gemma4_prompt import render_gemma4, strip_thinking
from .output import (
    GEMMA3_OUTPUT, GEMMA4_OUTPUT, ContentDelta, OutputSyntax, ParsedTurn, StreamEvent, StreamParser, ThoughtDelta,
    ToolCallComplete, parse_output,
)
from .template import ChatTemplate, ChatTemplateError, load_chat_template
from .tokens import GEMMA3_SPECIAL_TOKEN_IDS, GEMMA4_SPECIAL_TOKEN_IDS, STOP_TOKEN_IDS
from .tool_syntax import (
    ToolCall, ToolCallError, encode_tool_call, encode_tool_response, format_value, parse_tool_call, parse_tool_calls,
)
from .tools import ToolDefinitionError, function_tool, normalize_tool, normalize_tools

__all__ = [
    "FAMILIES", "ChatFormat", "normalize_messages",
    "render_gemma3", "render_gemma4", "strip_thinking",
    "GEMMA3_OUTPUT", "GEMMA4_OUTPUT", "ContentDelta", "OutputSyntax", "ParsedTurn", "StreamEvent", "StreamParser",
    "ThoughtDelta", "ToolCallComplete", "parse_output",
    "ChatTemplate", "ChatTemplateError", "load_chat_template",
    "GEMMA3_SPECIAL_TOKEN_IDS", "GEMMA4_SPECIAL_TOKEN_IDS", "STOP_TOKEN_IDS",
    "ToolCall", "ToolCallError", "encode_tool_call", "encode_tool_response", "format_value", "parse_tool_call",
    "parse_tool_calls",
    "ToolDefinitionError", "function_tool", "normalize_tool", "normalize_tools",
]

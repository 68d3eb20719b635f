"""Shared test data: the stored reference templates and the conversations rendered with them."""

from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data"
GEMMA4_SOURCE = (DATA / "gemma4_chat_template.jinja").read_text(encoding="utf-8")
GEMMA3_SOURCE = (DATA / "gemma3_chat_template.jinja").read_text(encoding="utf-8")

# The stored Gemma 4 template is a 26B/31B one; E2B/E4B templates end the generation prompt at
# `<|turn>model\n`. Removing these lines gives that variant of the same revision.
EMPTY_THOUGHT_LINES = """        {%- if not enable_thinking | default(false) -%}
            {{- '<|channel>thought\\n<channel|>' -}}
        {%- endif -%}
"""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Unit"},
                "days": {"type": "integer", "description": "Forecast days", "nullable": True},
            },
            "required": ["city"],
        },
    },
}
FLIGHTS = {
    "type": "function",
    "function": {
        "name": "search_flights",
        "description": "Find flights.",
        "parameters": {
            "type": "object",
            "properties": {
                "route": {
                    "type": "object",
                    "description": "Where from and to",
                    "properties": {"from": {"type": "string"}, "to": {"type": "string", "description": "IATA"}},
                    "required": ["from", "to"],
                },
                "passengers": {
                    "type": "array",
                    "description": "Who flies",
                    "items": {
                        "type": "object",
                        "properties": {"name": {"type": "string"}, "age": {"type": "integer", "nullable": True}},
                        "required": ["name"],
                    },
                },
                "classes": {"type": "array", "items": {"type": "string", "enum": ["economy", "business"]}},
                "matrix": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                "filters": {"type": "object", "description": "Free-form filters", "maxStops": {"type": "integer"}},
                "Zebra": {"type": "boolean"},
            },
            "required": ["route", "passengers"],
        },
        "response": {"type": "object", "description": "Matching flights"},
    },
}
PING = {"name": "ping", "description": "Check the service.", "parameters": {"type": "object", "properties": {}}}
NOW = {"type": "function", "function": {"name": "now"}}
TOOLS = [WEATHER, FLIGHTS, PING, NOW]


def call(name, arguments, call_id=None):
    result = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return {**result, "id": call_id} if call_id else result


CONVERSATIONS = {
    "plain": [{"role": "user", "content": "  Hello there!\n"}],
    "system": [
        {"role": "system", "content": "You are terse.\n"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ],
    "developer": [{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Hi"}],
    "system_parts": [
        {"role": "system", "content": [{"type": "text", "text": " Be kind. "}, {"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": "Hi"},
    ],
    "late_system": [
        {"role": "user", "content": "Hi"},
        {"role": "system", "content": "Now be formal."},
        {"role": "user", "content": "Hello"},
    ],
    "one_tool_round": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [call("get_weather", {"city": "Paris", "unit": "celsius"}, "c1")],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 20, "sky": "clear"}'},
        {"role": "assistant", "content": "It is 20°C and clear."},
        {"role": "user", "content": "Thanks"},
    ],
    "several_calls_pending_answer": [
        {"role": "user", "content": "Compare Paris and Rome, and find flights."},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "I need both cities.",
            "tool_calls": [
                call("get_weather", {"city": "Paris"}, "a"),
                call("get_weather", {"city": "Rome", "days": None}, "b"),
                call(
                    "search_flights",
                    {
                        "route": {"from": "CDG", "to": "FCO"},
                        "passengers": [{"name": "Ann", "age": 31}, {"name": "Bo", "age": None}],
                        "Zebra": False,
                        "ratio": -1.5e-07,
                        "note": 'a {tricky}, "quoted": [string]\nwith lines',
                    },
                    "c",
                ),
            ],
        },
        {"role": "tool", "tool_call_id": "b", "content": "sunny"},
        {"role": "tool", "name": "get_weather", "content": [{"type": "text", "text": "rain"}, {"type": "image"}]},
        {"role": "tool", "tool_call_id": "c", "content": 3},
    ],
    "pending_call": [
        {"role": "user", "content": "Ping it"},
        {"role": "assistant", "tool_calls": [call("ping", {})]},
    ],
    "string_arguments": [
        {"role": "user", "content": "Ping it"},
        {"role": "assistant", "tool_calls": [call("ping", "host:<|\"|>a<|\"|>")]},
        {"role": "tool", "name": "ping", "content": None},
        {"role": "assistant", "content": "Done."},
    ],
    "legacy_tool_responses": [
        {"role": "user", "content": "Ping"},
        {
            "role": "assistant",
            "tool_calls": [call("ping", {"n": 2})],
            "tool_responses": [{"name": "ping", "response": {"ok": True, "ms": [1.5, 2]}}, {"response": "late"}],
        },
        {"role": "assistant", "content": "Pong."},
    ],
    "thoughts_in_history": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<|channel>thought\nEasy.<channel|>4", "reasoning": "dropped: not last"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": [{"type": "text", "text": "<|channel>thought\nHm<channel|> 6 "}]},
    ],
    "reasoning_kept_on_tool_turn": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "reasoning": "Call it.", "tool_calls": [call("get_weather", {"city": "Oslo"}, "w")]},
        {"role": "tool", "tool_call_id": "w", "content": "cold"},
        {"role": "assistant", "content": "Cold.", "reasoning_content": "no tool calls: dropped"},
    ],
    "multimodal": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe "},
                {"type": "image", "url": "cat.png"},
                {"type": "text", "text": " and "},
                {"type": "audio"},
                {"type": "video"},
                {"type": "unknown_part"},
            ],
        },
    ],
}


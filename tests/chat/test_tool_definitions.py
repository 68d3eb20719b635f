"""Tool declarations from Python functions and from JSON schema, and their errors."""

from typing import Literal, Optional

import pytest

from gemma4.chat import ChatFormat, ToolDefinitionError, function_tool, normalize_tool, normalize_tools


def get_weather(
    city: str,
    unit: Literal["celsius", "fahrenheit"] = "celsius",
    days: Optional[int] = None,
    tags: list[str] | None = None,
    options: dict = None,
    ratio: float = 1.0,
    exact: bool = False,
    points: tuple[int, ...] = (),
):
    """Get the weather for a city.

    Uses the public API.

    Args:
        city (str): The city
            to look up.
        unit: Temperature unit.
        days: Forecast length: in days.
        *extra: not a parameter here.

    Returns:
        dict: The forecast.
    """


def test_python_function_declaration():
    assert function_tool(get_weather) == {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather for a city.\n\nUses the public API.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city to look up."},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit."},
                    "days": {"type": "integer", "nullable": True, "description": "Forecast length: in days."},
                    "tags": {"type": "array", "items": {"type": "string"}, "nullable": True},
                    "options": {"type": "object"},
                    "ratio": {"type": "number"},
                    "exact": {"type": "boolean"},
                    "points": {"type": "array", "items": {"type": "integer"}},
                },
                "required": ["city"],
            },
        },
    }


def test_python_function_renders_like_its_schema(gemma4_template):
    messages = [{"role": "user", "content": "Weather?"}]
    builtin = ChatFormat("gemma4").render(messages, [get_weather])
    assert builtin == ChatFormat("gemma4", gemma4_template, ).render(messages, [function_tool(get_weather)]).replace(
        "<|channel>thought\n<channel|>", ""
    )
    assert 'declaration:get_weather{description:<|"|>Get the weather for a city.' in builtin
    assert 'unit:{description:<|"|>Temperature unit.<|"|>,enum:[<|"|>celsius<|"|>,' in builtin


def test_function_without_docstring_or_parameters():
    def now():
        pass

    assert function_tool(now) == {"type": "function", "function": {"name": "now", "parameters": {
        "type": "object", "properties": {}}}}


def _no_hint(x): ...
def _varargs(*items: int): ...
def _union(x: int | str): ...
def _set(x: set): ...
def _mixed_literal(x: Literal["a", 1]): ...
def _fixed_tuple(x: tuple[int, str]): ...


@pytest.mark.parametrize(
    ("fn", "message"),
    [(_no_hint, "no type hint"), (_varargs, r"\*args"), (_union, "Optional"), (_set, "unsupported type"),
     (_mixed_literal, "Literal"), (_fixed_tuple, "tuple"), (lambda x: x, "__name__")],
)
def test_bad_python_functions(fn, message):
    with pytest.raises(ToolDefinitionError, match=message):
        function_tool(fn)


def test_accepted_dict_forms_normalize_to_openai_form():
    schema = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    openai = {"type": "function", "function": {"name": "search", "description": "Search.", "parameters": schema}}
    bare = {"name": "search", "description": "Search.", "parameters": schema}
    responses_api = {"type": "function", **bare}
    assert normalize_tool(bare) == normalize_tool(responses_api) == normalize_tool(openai) == openai
    assert normalize_tools([]) is None and normalize_tools(None) is None


@pytest.mark.parametrize(
    ("tool", "message"),
    [
        ({"description": "no name"}, "tool name"),
        ({"name": "two words"}, "tool name"),
        ({"type": "retrieval", "function": {"name": "f"}}, "only function tools"),
        ({"function": "f"}, "must be a dict"),
        ({"name": "f", "description": 3}, "description"),
        ({"name": "f", "parameters": []}, "JSON schema object"),
        ({"name": "f", "parameters": {"type": "object", "properties": ["q"]}}, "'properties'"),
        ({"name": "f", "parameters": {"properties": {"q": "string"}}}, r"parameters\.q"),
        ({"name": "f", "parameters": {"properties": {"q": {"type": 5}}}}, "'type'"),
        ({"name": "f", "parameters": {"properties": {"q": {}}, "required": "q"}}, "'required'"),
        ({"name": "f", "parameters": {"properties": {"q": {}}, "required": ["r"]}}, "not among the properties"),
        ({"name": "f", "parameters": {"properties": {"l": {"type": "array", "items": 3}}}}, r"l\[items\]"),
        (42, "a dict or a function"),
    ],
)
def test_bad_tool_dicts(tool, message):
    with pytest.raises(ToolDefinitionError, match=message):
        normalize_tool(tool)


def test_tool_lists_are_checked():
    with pytest.raises(ToolDefinitionError, match="list of tools"):
        normalize_tools({"name": "f"})
    with pytest.raises(ToolDefinitionError, match="unique"):
        normalize_tools([{"name": "f"}, {"type": "function", "function": {"name": "f"}}])

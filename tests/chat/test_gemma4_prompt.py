"""The built-in Gemma 4 renderer against the stored reference template, rendered through Jinja."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chat_cases import CONVERSATIONS, TOOLS, WEATHER, call

from gemma4.chat import ChatFormat, ChatTemplateError, normalize_messages, normalize_tools, render_gemma4


def _pairs():
    for name in CONVERSATIONS:
        for thinking in (False, True):
            for generation in (True, False):
                yield pytest.param(name, thinking, generation, id=f"{name}-think{int(thinking)}-gen{int(generation)}")


@pytest.mark.parametrize("with_tools", [False, True], ids=["no_tools", "tools"])
@pytest.mark.parametrize(("name", "thinking", "generation"), list(_pairs()))
def test_builtin_matches_reference_template(gemma4_template, gemma4_small_template, name, thinking, generation,
                                            with_tools):
    messages = CONVERSATIONS[name]
    tools = TOOLS if with_tools else None
    for template, empty_thought in ((gemma4_template, True), (gemma4_small_template, False)):
        expected = ChatFormat("gemma4", template).render(messages, tools, thinking, generation)
        builtin = ChatFormat("gemma4", empty_thought_when_not_thinking=empty_thought)
        assert builtin.render(messages, tools, thinking, generation) == expected


def test_layout_in_words(gemma4_template):
    """The format as spec 4.3 describes it, spelled out once."""
    fmt = ChatFormat("gemma4", gemma4_template)
    assert fmt.render(CONVERSATIONS["plain"]) == (
        "<bos><|turn>user\nHello there!<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    )
    assert fmt.render(CONVERSATIONS["plain"], enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHello there!<turn|>\n<|turn>model\n"
    )
    prompt = fmt.render(CONVERSATIONS["one_tool_round"][:4], [WEATHER])
    assert prompt == (
        "<bos><|turn>system\nUse tools."
        '<|tool>declaration:get_weather{description:<|"|>Current weather for a city.<|"|>,parameters:{properties:{'
        'city:{description:<|"|>City name<|"|>,type:<|"|>STRING<|"|>},'
        'days:{description:<|"|>Forecast days<|"|>,nullable:true,type:<|"|>INTEGER<|"|>},'
        'unit:{description:<|"|>Unit<|"|>,enum:[<|"|>celsius<|"|>,<|"|>fahrenheit<|"|>],type:<|"|>STRING<|"|>}},'
        'required:[<|"|>city<|"|>],type:<|"|>OBJECT<|"|>}}<tool|><turn|>\n'
        "<|turn>user\nWeather in Paris?<turn|>\n"
        '<|turn>model\n<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,unit:<|"|>celsius<|"|>}<tool_call|>'
        '<|tool_response>response:get_weather{value:<|"|>{"temp": 20, "sky": "clear"}<|"|>}<tool_response|>'
    )


def test_direct_renderer_call_without_format_object(gemma4_template):
    messages, tools = CONVERSATIONS["one_tool_round"], normalize_tools(TOOLS)
    expected = gemma4_template.render(messages, tools, enable_thinking=True)
    assert render_gemma4(messages, tools, enable_thinking=True) == expected


def test_nameless_tool_response_fails_in_both(gemma4_template):
    messages = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [call("ping", {}, "p")]},
        {"role": "tool", "tool_call_id": "other", "content": "?"},
    ]
    with pytest.raises(ChatTemplateError):
        gemma4_template.render(messages)
    with pytest.raises(ValueError, match="tool name"):
        render_gemma4(messages)


@pytest.mark.parametrize(
    "messages",
    [[], [{"role": "robot", "content": "x"}], [{"role": "user", "content": 5}],
     [{"role": "assistant", "tool_calls": [{"function": {}}]}]],
    ids=["empty", "unknown_role", "bad_content", "call_without_name"],
)
def test_builtin_rejects_malformed_messages(messages):
    with pytest.raises((ValueError, TypeError)):
        render_gemma4(messages)


# Random conversations: parity must hold beyond the hand-written cases.
_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12) | st.sampled_from(
    ["", " pad ", "<|channel>thought\nx<channel|>y", "a<channel|>b", "<|channel>open"]
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.floats(allow_nan=False, allow_infinity=False) | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text("abcXYZ_", min_size=1, max_size=4), inner,
                                                                 max_size=3),
    max_leaves=8,
)
_part = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, _text),
    st.sampled_from([{"type": "image"}, {"type": "audio"}, {"type": "video"}, {"type": "image_url"}]),
)
_content = st.none() | _text | st.lists(_part, max_size=3)
_call = st.builds(
    lambda name, args, call_id: call(name, args, call_id),
    st.sampled_from(["ping", "get_weather", "now"]),
    st.dictionaries(st.text("abcdefXY_", min_size=1, max_size=5), _json, max_size=3),
    st.sampled_from(["id1", "id2", None]),
)


@st.composite
def _messages(draw):
    messages = []
    for _ in range(draw(st.integers(1, 6))):
        role = draw(st.sampled_from(["system", "developer", "user", "assistant", "tool"]))
        message = {"role": role, "content": draw(_content)}
        if role == "assistant" and draw(st.booleans()):
            message["tool_calls"] = draw(st.lists(_call, min_size=1, max_size=2))
            message["reasoning_content"] = draw(st.none() | _text)
        if role == "tool":
            message["name"] = draw(st.sampled_from(["ping", "get_weather"]))
            message["tool_call_id"] = draw(st.sampled_from(["id1", "id3"]))
            message["content"] = draw(_content | st.integers() | st.booleans())
        messages.append(message)
    return messages


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=_messages(), thinking=st.booleans(), generation=st.booleans(), with_tools=st.booleans())
def test_builtin_matches_reference_on_random_conversations(gemma4_template, messages, thinking, generation,
                                                           with_tools):
    tools = normalize_tools(TOOLS if with_tools else None)
    messages = normalize_messages(messages)
    expected = gemma4_template.render(messages, tools, add_generation_prompt=generation, enable_thinking=thinking)
    actual = render_gemma4(messages, tools, enable_thinking=thinking, add_generation_prompt=generation,
                           empty_thought_when_not_thinking=True)
    assert actual == expected


def _with_required(schema):
    if isinstance(schema.get("properties"), dict):
        schema["required"] = sorted(schema["properties"])[: len(schema["properties"]) // 2 + 1]
    return schema


_schema = st.deferred(lambda: st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["string", "integer", "number", "boolean", "array", "object", "Object"]),
    "description": _text,
    "enum": st.lists(st.text("abc", max_size=3) | st.integers(), max_size=3),
    "nullable": st.booleans(),
    "items": _schema,
    "properties": st.dictionaries(st.text("abcAB_", min_size=1, max_size=4), _schema, max_size=3),
    "maxLength": st.integers(0, 9),
}).map(_with_required))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parameters=_schema, description=st.none() | _text, response=st.none() | _schema)
def test_declarations_match_reference_on_random_schemas(gemma4_template, parameters, description, response):
    function = {"name": "f", "parameters": parameters}
    if description is not None:
        function["description"] = description
    if response is not None:
        function["response"] = response
    tools = normalize_tools([function])
    messages = [{"role": "user", "content": "hi"}]
    expected = gemma4_template.render(messages, tools)
    assert render_gemma4(messages, tools, empty_thought_when_not_thinking=True) == expected

"""The Gemma 4 tool-call codec: property-based round trips and malformed input."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemma4.chat import (
    ToolCall, ToolCallError, encode_tool_call, encode_tool_response, format_value, parse_output, parse_tool_call,
    parse_tool_calls,
)

# Unicode text with every delimiter the syntax uses, except the two strings it cannot escape.
_TRICKY = st.sampled_from(["{", "}", ",", ":", "[", "]", '"', "'", "\n", "<", "|", ">", "<|", "call:", " "])
_strings = st.lists(st.text(max_size=6) | _TRICKY, max_size=5).map("".join).filter(
    lambda s: '<|"|>' not in s and "<tool_call|>" not in s
)
_keys = st.text(st.characters(categories=("L", "Nd"), include_characters="_-."), min_size=1, max_size=8)
_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | _strings
_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4), max_leaves=12
)
_arguments = st.dictionaries(_keys, _values, max_size=5)
_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,15}", fullmatch=True)


def typed(value):
    """The value with types made explicit, so `True` != `1` and `1.0` != `1` in comparisons."""
    if isinstance(value, dict):
        return ("dict", sorted((key, typed(item)) for key, item in value.items()))
    if isinstance(value, list):
        return ("list", [typed(item) for item in value])
    return (type(value).__name__, value)


@settings(max_examples=100, deadline=None)
@given(name=_names, arguments=_arguments)
def test_encode_then_parse_round_trips(name, arguments):
    parsed = parse_tool_call(encode_tool_call(name, arguments))
    assert isinstance(parsed, ToolCall), parsed
    assert parsed.name == name
    assert typed(parsed.arguments) == typed(arguments)


@settings(max_examples=30, deadline=None)
@given(calls=st.lists(st.tuples(_names, _arguments), min_size=1, max_size=4), gap=st.sampled_from(["", "\n", " "]))
def test_several_calls_in_a_row(calls, gap):
    text = gap.join(encode_tool_call(name, arguments) for name, arguments in calls)
    parsed = parse_tool_calls(text)
    assert [(call.name, typed(call.arguments)) for call in parsed] == [(n, typed(a)) for n, a in calls]


def test_value_spelling():
    assert encode_tool_call("f", {"b": [1, 2.5, -3e-09, None, True], "A": {"x": 'y"z'}, "e": {}, "l": []}) == (
        '<|tool_call>call:f{A:{x:<|"|>y"z<|"|>},b:[1,2.5,-3e-09,None,true],e:{},l:[]}<tool_call|>'
    )
    assert format_value({"k": "v"}, escape_keys=True) == '{<|"|>k<|"|>:<|"|>v<|"|>}'


def test_parser_accepts_model_variants():
    text = 'call:f{ a : null , <|"|>b c<|"|>:[ 1 ,-2E+3, .5 ],d:{}}'
    assert parse_tool_call(text) == ToolCall("f", {"a": None, "b c": [1, -2000.0, 0.5], "d": {}})


def test_tool_response_encoding():
    assert encode_tool_response("get", {"temp": 20, "sky": "clear"}) == (
        '<|tool_response>response:get{sky:<|"|>clear<|"|>,temp:20}<tool_response|>'
    )
    listed = '<|tool_response>response:get{value:[1,<|"|>a<|"|>]}<tool_response|>'
    assert encode_tool_response("get", [1, "a"]) == listed
    assert encode_tool_response("get", "ok") == '<|tool_response>response:get{value:<|"|>ok<|"|>}<tool_response|>'


MALFORMED = [
    "",
    "call:",
    "call:f",
    "call:f{",
    "call:f{a",
    "call:f{a:",
    "call:f{a:1",
    "call:f{a:1,",
    'call:f{a:<|"|>unterminated',
    "call:f{a:[1,2",
    "call:f{a:{b:1}",
    "call:f{a:1}}",
    "call:f{a:1} trailing",
    "call:f{a:tru}",
    "call:f{a:nullx}",
    "call:f{a:12abc}",
    "call:f{:1}",
    "call:f{a:1,}",
    "call:f{a:[1,]}",
    "call:f{a:-}",
    "call:f{a:1e999}",
    "call:f{a:" + "9" * 5000 + "}",
    "call:f{a:" + "[" * 500 + "]" * 500 + "}",
    "call:{a:1}",
    "call:two words{a:1}",
    "f{a:1}",
    "<|tool_call>call:f{a:1}",
    '<|tool_call>call:f{a:<|"|>x',
]


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_calls_give_an_error_value(text):
    result = parse_tool_call(text)
    assert isinstance(result, ToolCallError)
    assert result.raw == text and result.message


def test_truncated_last_call_in_a_row():
    text = encode_tool_call("a", {"x": 1}) + "<|tool_call>call:b{y:[1,"
    first, second = parse_tool_calls(text)
    assert first == ToolCall("a", {"x": 1})
    assert isinstance(second, ToolCallError) and "truncated" in second.message


@pytest.mark.parametrize("bad", [{1: "x"}, {"x": {1, 2}}, {"x": float("nan")}, {"x": object()}])
def test_encoder_rejects_values_it_cannot_spell(bad):
    with pytest.raises((TypeError, ValueError)):
        encode_tool_call("f", bad)


@pytest.mark.parametrize("name", ["", "two words", "f{", None])
def test_encoder_rejects_bad_names(name):
    with pytest.raises(ValueError):
        encode_tool_call(name, {})


_SOUP = st.lists(
    st.sampled_from(['<|"|>', "{", "}", "[", "]", ",", ":", "true", "null", "None", "1", "-2.5e3", ".", "a", " ",
                     "\n", "call:", "<|tool_call>", "<tool_call|>", "<|channel>", "<channel|>", "<turn|>"])
    | st.text(max_size=3),
    max_size=25,
).map("".join)


@settings(max_examples=200, deadline=None)
@given(text=_SOUP)
def test_parsing_never_raises(text):
    for candidate in (text, "call:f{" + text, "<|tool_call>call:f{" + text + "}<tool_call|>"):
        assert isinstance(parse_tool_call(candidate), (ToolCall, ToolCallError))
    assert all(isinstance(call, (ToolCall, ToolCallError)) for call in parse_tool_calls(text))
    parse_output(text)

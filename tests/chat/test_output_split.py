"""Splitting generated text into thoughts, answer and tool calls, whole and streamed."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemma4.chat import (
    GEMMA3_OUTPUT, ChatFormat, ContentDelta, ParsedTurn, StreamParser, ThoughtDelta, ToolCall, ToolCallComplete,
    ToolCallError, encode_tool_call, parse_output,
)

OUTPUTS = {
    "answer": "The answer is 4.<turn|>",
    "thought_then_answer": "<|channel>thought\nLet me add: 2+2.\n<channel|>\n\nIt is **4**.<turn|>",
    "empty_thought": "<|channel>thought\n<channel|>Four.<eos>",
    "calls": (
        '<|channel>thought\nNeed weather.<channel|><|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
        '<|tool_call>call:get_time{tz:<|"|>CET, "local" {x:[1]}<|"|>,dst:false}<tool_call|><|tool_response>'
    ),
    "continued_after_response": (
        '<|tool_call>call:f{}<tool_call|><|tool_response>response:f{value:1}<tool_response|>Done <b>.<turn|>\nignored'
    ),
    "truncated_call": "Calling: <|tool_call>call:f{a:[1,2",
    "malformed_then_good": "<|tool_call>call:f{a:oops}<tool_call|><|tool_call>call:g{b:2}<tool_call|>",
    "no_end_marker": "  partial answer with a < sign and <| bar ",
    "marker_prefix_at_end": "Hello <|chan",
    "unclosed_thought": "<|channel>thought\nstill thinking",
}


def stream(text, cuts, parser=None):
    parser = parser or StreamParser()
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    turn = ParsedTurn()
    for event in [event for piece in pieces for event in parser.feed(piece)] + parser.finish():
        turn.add(event)
    return turn


def test_whole_text_splitting():
    assert parse_output(OUTPUTS["thought_then_answer"]) == ParsedTurn("It is **4**.", "Let me add: 2+2.")
    calls = parse_output(OUTPUTS["calls"])
    assert calls.content == "" and calls.reasoning == "Need weather."
    assert calls.tool_calls == [
        ToolCall("get_weather", {"city": "Paris"}),
        ToolCall("get_time", {"tz": 'CET, "local" {x:[1]}', "dst": False}),
    ]
    assert parse_output(OUTPUTS["continued_after_response"]) == ParsedTurn("Done <b>.", "", [ToolCall("f", {})])
    truncated = parse_output(OUTPUTS["truncated_call"])
    assert truncated.content == "Calling:" and truncated.tool_calls == []
    assert truncated.tool_call_errors == [ToolCallError("truncated tool call: no closing <tool_call|>",
                                                        "<|tool_call>call:f{a:[1,2")]
    mixed = parse_output(OUTPUTS["malformed_then_good"])
    assert mixed.tool_calls == [ToolCall("g", {"b": 2})] and len(mixed.tool_call_errors) == 1
    assert parse_output(OUTPUTS["marker_prefix_at_end"]).content == "Hello <|chan"
    assert parse_output(OUTPUTS["unclosed_thought"]) == ParsedTurn("", "still thinking")


@pytest.mark.parametrize("name", OUTPUTS)
def test_every_split_point_gives_the_whole_text_result(name):
    text = OUTPUTS[name]
    whole = parse_output(text)
    for cut in range(len(text) + 1):
        assert stream(text, [cut]) == whole, cut
    assert stream(text, list(range(1, len(text)))) == whole


def test_partial_markers_are_held_back():
    parser = StreamParser()
    assert parser.feed("Hello <|chan") == [ContentDelta("Hello")]
    assert parser.feed("nel>thou") == []
    assert parser.feed("ght\nhm <") == [ThoughtDelta("hm")]
    assert parser.feed("channel|>ok <|tool_call>call:f{") == [ContentDelta(" ok")]  # "Hello ok"
    assert parser.feed("}<tool_call|>") == [ToolCallComplete(ToolCall("f", {}))]
    assert parser.feed("<turn|>more") == [] and parser.finish() == []


def test_prompt_ending_in_an_open_thought():
    fmt = ChatFormat("gemma4")
    text = "reasoning here<channel|>answer<turn|>"
    assert fmt.parse(text, prompt="<|turn>model\n<|channel>thought\n") == ParsedTurn("answer", "reasoning here")
    assert fmt.parse(text, prompt="<|turn>model\n<|channel>thought\n<channel|>").reasoning == ""
    parser = fmt.stream_parser(prompt="...<|channel>thought\n")
    assert parser.feed(text) == [ThoughtDelta("reasoning here"), ContentDelta("answer")]


def test_gemma3_output_is_content_only():
    text = "<|channel>thought\nnot special here<channel|> answer <end_of_turn>rest"
    assert parse_output(text, GEMMA3_OUTPUT) == ParsedTurn("<|channel>thought\nnot special here<channel|> answer")
    assert ChatFormat("gemma3").parse(text) == parse_output(text, GEMMA3_OUTPUT)
    assert stream(text, [20, 50], StreamParser(GEMMA3_OUTPUT)) == parse_output(text, GEMMA3_OUTPUT)


# Random turns built from known segments; the alphabet cannot spell any marker by accident.
_plain = st.text("ab <|>\n{}:", max_size=8)
_call = st.tuples(st.sampled_from(["f", "get_x"]), st.dictionaries(st.sampled_from("xyz"), st.integers() | _plain))
_segment = st.one_of(
    st.tuples(st.just("content"), _plain),
    st.tuples(st.just("thought"), _plain),
    st.tuples(st.just("call"), _call),
)


@settings(max_examples=100, deadline=None)
@given(segments=st.lists(_segment, max_size=6), end=st.sampled_from(["", "<turn|>", "<|tool_response>", "<eos>"]),
       data=st.data())
def test_random_turns_split_and_stream_consistently(segments, end, data):
    text = ""
    for kind, value in segments:
        if kind == "content":
            text += value
        elif kind == "thought":
            text += "<|channel>thought\n" + value + "<channel|>"
        else:
            text += encode_tool_call(*value)
    text += end
    whole = parse_output(text)
    assert whole.content == "".join(v for k, v in segments if k == "content").strip()
    assert whole.reasoning == "".join(v for k, v in segments if k == "thought").strip()
    assert whole.tool_calls == [ToolCall(*v) for k, v in segments if k == "call"]
    cuts = sorted(data.draw(st.sets(st.integers(0, len(text)), max_size=8)))
    assert stream(text, cuts) == whole

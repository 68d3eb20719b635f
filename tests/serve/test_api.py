"""End to end with the official `openai` client against a real uvicorn server on 127.0.0.1:0.

Plain chat/completions text comes from the tiny random model itself. Tool calls and thoughts are
scripted at the engine boundary (`#script` markers, see serve_helpers.ScriptHook); JSON output and
tool_choice-forced calls come from real constrained decoding (llguidance) of the random model.
"""

import json
import threading

import httpx
import jsonschema
import openai
import pytest

from serve_helpers import MODEL_NAME, make_app, running_server, served

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string"}, "precise": {"type": "boolean"}}}}}


@pytest.fixture(scope="module")
def server(loaded):
    app = make_app(loaded)
    with running_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def user(text):
    return [{"role": "user", "content": text}]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert httpx.get(server[0] + "/health").json() == {"status": "ok"}


def test_chat_whole_and_streamed_agree(client):
    kwargs = dict(model=MODEL_NAME, messages=user("Hello there"), max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    choice = whole.choices[0]
    assert choice.finish_reason == "length" and whole.usage.completion_tokens == 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12
    assert whole.id.startswith("chatcmpl-") and choice.message.role == "assistant"

    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1


def test_completions_logprobs_and_stream(client):
    whole = client.completions.create(model=MODEL_NAME, prompt="Once upon", max_tokens=10, temperature=0, logprobs=2)
    c = whole.choices[0]
    assert len(c.logprobs.tokens) == 10 and all(len(t) == 2 for t in c.logprobs.top_logprobs)
    assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model=MODEL_NAME, prompt="Once upon", max_tokens=10, temperature=0, stream=True) if ch.choices)
    assert streamed == c.text


def test_chat_logprobs_seed_and_penalties(client):
    kwargs = dict(model=MODEL_NAME, messages=user("Pick words"), max_tokens=8, temperature=1.0, top_p=0.9,
                  seed=1234, presence_penalty=0.5, frequency_penalty=0.5, logprobs=True, top_logprobs=3,
                  extra_body={"top_k": 50, "min_p": 0.01})
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert a.choices[0].message.content == b.choices[0].message.content  # same seed, same output
    items = a.choices[0].logprobs.content
    assert len(items) == 8 and all(len(i.top_logprobs) == 3 for i in items)


def test_stop_string_is_cut(client):
    base = client.chat.completions.create(model=MODEL_NAME, messages=user("abc"), max_tokens=16, temperature=0)
    text = base.choices[0].message.content
    stop = text[5:7]
    cut = client.chat.completions.create(model=MODEL_NAME, messages=user("abc"), max_tokens=16, temperature=0,
                                         stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)].strip()


def test_tool_call_round_trip(server, client):
    first = client.chat.completions.create(model=MODEL_NAME, messages=user("Weather in Paris? #weather-call"),
                                           tools=[WEATHER], max_tokens=64)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")

    history = user("Weather in Paris?") + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21} #answer'},
    ]
    second = client.chat.completions.create(model=MODEL_NAME, messages=history, tools=[WEATHER], max_tokens=32)
    assert second.choices[0].message.content == "Sunny, 21 degrees."
    assert second.choices[0].finish_reason == "stop"
    # The tool result went back into the same model turn, as the chat format writes it.
    ids, text = served(server[1]).prompts.chat(history, [WEATHER], False)
    assert '<|tool_response>response:get_weather{value:<|"|>{"temp": 21} #answer<|"|>}<tool_response|>' in text
    assert text.count("<|turn>model") == 1


def test_streamed_tool_calls_are_indexed(client):
    stream = client.chat.completions.create(model=MODEL_NAME, messages=user("Both please #two-calls"),
                                            tools=[WEATHER, TIME], max_tokens=96, stream=True)
    calls, finish = {}, None
    for chunk in stream:
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"name": "", "arguments": "", "id": tc.id})
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and sorted(calls) == [0, 1]
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    assert json.loads(calls[1]["arguments"]) == {"zone": "CET", "precise": True}
    assert calls[0]["id"] != calls[1]["id"]


def test_malformed_tool_call_comes_back_as_content(client):
    out = client.chat.completions.create(model=MODEL_NAME, messages=user("x #bad-call"), tools=[WEATHER],
                                         max_tokens=64)
    choice = out.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert "call:get_weather{city:oops" in choice.message.content


def test_tool_choice_named_forces_a_parseable_call(client):
    out = client.chat.completions.create(model=MODEL_NAME, messages=user("anything"), tools=[WEATHER, TIME],
                                         tool_choice={"type": "function", "function": {"name": "get_time"}},
                                         max_tokens=200, temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_time"
    assert set(json.loads(call.function.arguments)) <= {"zone", "precise"}


def test_reasoning_split_whole_and_streamed(client):
    kwargs = dict(model=MODEL_NAME, messages=user("Weather? #thought"), max_tokens=80,
                  extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    whole = client.chat.completions.create(**kwargs)
    message = whole.choices[0].message
    assert message.content == "It is sunny in Paris."
    assert message.reasoning_content == message.reasoning == "The user asks about Paris."
    assert whole.usage.completion_tokens_details.reasoning_tokens == len("thought\nThe user asks about Paris.")

    reasoning, content = "", ""
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        delta = chunk.choices[0].delta
        assert not (getattr(delta, "reasoning_content", None) and delta.content)  # never in the same chunk
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
    assert (reasoning, content) == ("The user asks about Paris.", "It is sunny in Paris.")


def test_thinking_budget_closes_the_thought(client):
    out = client.chat.completions.create(model=MODEL_NAME, messages=user("Think #open-thought"), max_tokens=40,
                                         reasoning_effort="high", temperature=0, extra_body={"thinking_budget": 12})
    # The script opens the thought channel, the random model fills it, the budget closes it.
    assert out.usage.completion_tokens_details.reasoning_tokens == 12
    assert out.choices[0].message.reasoning_content


def test_json_schema_output_validates(client):
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                               "sunny": {"type": "boolean"},
                                               "rank": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["city", "sunny", "rank"], "additionalProperties": False}
    out = client.chat.completions.create(
        model=MODEL_NAME, messages=user("Weather as JSON"), max_tokens=120, temperature=0.7, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}})
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)

    obj = client.chat.completions.create(model=MODEL_NAME, messages=user("JSON please"), max_tokens=200,
                                         temperature=0, response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":  # "length" leaves partial JSON (documented)
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    else:
        assert obj.choices[0].message.content.startswith("{")


def test_multibyte_text_streams_whole(client):
    chunks = client.chat.completions.create(model=MODEL_NAME, messages=user("#emoji"), max_tokens=40, stream=True)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == "Caf\u00e9 \U0001F600 ok"
    assert all("\ufffd" not in p for p in pieces)


def test_health_is_503_while_loading(loaded):
    from gemma4.serve import ServeConfig, build_app

    release = threading.Event()

    def slow_loader():
        release.wait(30)
        return loaded

    app = build_app(config=ServeConfig(model_name=MODEL_NAME), loader=slow_loader)
    with running_server(app) as url:
        r = httpx.get(url + "/health")
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        assert httpx.post(url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "x"}).status_code == 503
        release.set()
        for _ in range(200):
            if httpx.get(url + "/health").status_code == 200:
                break
            threading.Event().wait(0.05)
        assert httpx.get(url + "/health").status_code == 200


def test_metrics_exposes_vllm_style_names(server, client):
    client.completions.create(model=MODEL_NAME, prompt="metrics", max_tokens=3)
    text = httpx.get(server[0] + "/metrics").text
    for name in ("gemma4:num_requests_running", "gemma4:num_requests_waiting", "gemma4:kv_cache_usage_perc",
                 "gemma4:prompt_tokens_total", "gemma4:generation_tokens_total",
                 "gemma4:time_to_first_token_seconds_bucket", "gemma4:inter_token_latency_seconds_bucket",
                 "gemma4:e2e_request_latency_seconds_bucket", "gemma4:request_success_total"):
        assert name in text, name
    assert f'model_name="{MODEL_NAME}"' in text

"""Checkpoint templates: loading, HF-compatible rendering, and clear errors for bad templates."""

import json

import pytest
from chat_cases import CONVERSATIONS, GEMMA3_SOURCE, GEMMA4_SOURCE, TOOLS
from transformers.utils.chat_template_utils import render_jinja_template

from gemma4.chat import ChatTemplate, ChatTemplateError, load_chat_template, normalize_tools


@pytest.mark.parametrize("name", ["system", "several_calls_pending_answer", "thoughts_in_history", "multimodal"])
@pytest.mark.parametrize("thinking", [False, True])
def test_rendering_matches_transformers(name, thinking):
    """Our sandbox renders the reference exactly as transformers' `apply_chat_template` machinery."""
    messages, tools = CONVERSATIONS[name], normalize_tools(TOOLS)
    ours = ChatTemplate(GEMMA4_SOURCE).render(messages, tools, enable_thinking=thinking)
    (theirs,), _ = render_jinja_template(
        [messages], tools=tools, chat_template=GEMMA4_SOURCE, add_generation_prompt=True,
        enable_thinking=thinking, bos_token="<bos>", eos_token="<eos>",
    )
    assert ours == theirs


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{% if messages %}unclosed", "syntax error on line 1"),
        ("line one\n{{ messages[0]. }}", "syntax error on line 2"),
        ("{% endgeneration %}", "syntax error"),
    ],
)
def test_syntax_errors(source, message):
    with pytest.raises(ChatTemplateError, match=message):
        ChatTemplate(source)


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages['__class__'] }}",
        "{{ messages.append(1) }}",
        "{{ '{0.__class__}'.format(messages) }}",
        "{{ 'x' * 10 ** 9 }}",
        "{{ [1] * 2000000 }}",
        "{{ 10 ** (10 ** 10) }}",
    ],
)
def test_unsafe_templates_are_stopped(source):
    with pytest.raises(ChatTemplateError, match="unsafe"):
        ChatTemplate(source).render([{"role": "user", "content": "hi"}])


def test_renders_are_capped_in_size_and_time(monkeypatch):
    """A template that writes gigabytes, or loops for minutes writing nothing, stops with a clear
    error (the hostile-input probe of issue 22 rendered 1.5 GB, and ran a nested loop past 20 s);
    `range` keeps working as a sequence."""
    import time

    import gemma4.chat.template as template

    monkeypatch.setattr(template, "MAX_SECONDS", 0.5)
    user = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError, match="grew past 8,000,000 characters"):
        ChatTemplate("{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}").render(user)
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match="took more than 0.5 s"):
        ChatTemplate("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}").render(user)
    assert time.monotonic() - start < 2
    assert ChatTemplate("{{ range(3)|length }}{{ range(5)[2] }}{{ 4 in range(5) }}").render(user) == "32True"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{{ raise_exception('Only user turns, please') }}", "rejected the conversation: Only user turns"),
        ("{{ messages[3]['content'].x }}", "failed"),
        ("{{ 'a' + 1 }}", "TypeError"),
        ("{% set ns = namespace() %}{{ ns.__init__.__globals__ }}", "no attribute '__init__'"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    ],
)
def test_render_errors(source, message):
    with pytest.raises(ChatTemplateError, match=message):
        ChatTemplate(source, name="my template").render([{"role": "user", "content": "hi"}])


def test_helpers_hf_templates_expect():
    source = (
        "{{ bos_token }}{{ messages | tojson }}|{{ tools | tojson(indent=1) is string }}"
        "|{{ strftime_now('%Y') | length }}"
        "|{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}"
        "|{% generation %}{{ messages[0].content }}{% endgeneration %}|{{ documents }}|{{ enable_thinking }}"
    )
    messages = [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": "x"}]
    rendered = ChatTemplate(source, bos_token="<s>").render(messages, [{"a": 1}], documents="docs")
    assert rendered == '<s>' + json.dumps(messages, ensure_ascii=False) + "|True|4|user|héllo|docs|False"


def test_templates_see_only_plain_data():
    class Image:
        def save(self, path):
            raise AssertionError("a template must not reach this")

    source = "{{ messages[0].content[0].image }}{{ messages[0].content[0].image.save }}"
    messages = [{"role": "user", "content": [{"type": "image", "image": Image()}]}]
    assert ChatTemplate(source).render(messages) == "<Image>"


def test_loading_from_checkpoint_directories(tmp_path):
    assert load_chat_template(tmp_path) is None

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<BOS>"},
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ bos_token }}D"}],
    }))
    assert load_chat_template(tmp_path).render([]) == "<BOS>D"

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<E>"}))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "{{ eos_token }}P"}))
    assert load_chat_template(tmp_path).render([]) == "<E>P"

    (tmp_path / "chat_template.jinja").write_text(GEMMA3_SOURCE)
    template = load_chat_template(tmp_path)
    assert template.name.endswith("chat_template.jinja")
    assert template.render([{"role": "user", "content": "hi"}]).startswith("<bos><start_of_turn>user\nhi")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"tokenizer_config.json": "{not json"}, "cannot read"),
        ({"tokenizer_config.json": "[1]"}, "JSON object"),
        ({"chat_template.json": json.dumps({"chat_template": 5})}, "must be a string"),
        ({"chat_template.jinja": "{% for %}"}, "syntax error"),
    ],
)
def test_bad_checkpoint_files(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ChatTemplateError, match=message):
        load_chat_template(tmp_path)


def test_messages_must_be_a_list_of_dicts():
    with pytest.raises(ChatTemplateError, match="list of dicts"):
        ChatTemplate("x").render({"role": "user"})

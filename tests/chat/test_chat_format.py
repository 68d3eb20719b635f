"""ChatFormat: the family object the engine, CLI and server use."""

import ast
import json
from pathlib import Path

import pytest
from chat_cases import GEMMA4_SOURCE

import gemma4.chat
from gemma4.chat import GEMMA3_SPECIAL_TOKEN_IDS, GEMMA4_SPECIAL_TOKEN_IDS, ChatFormat, ToolCall, normalize_messages


def test_family_description():
    gemma4, gemma3 = ChatFormat("gemma4"), ChatFormat("gemma3")
    assert gemma4.stop_token_ids == {1, 106, 50} and gemma3.stop_token_ids == {1, 106}
    assert gemma4.special_token_ids['<|"|>'] == 52 and gemma4.special_token_ids["<|tool_response>"] == 50
    assert gemma3.special_token_ids["<end_of_turn>"] == 106
    assert len(set(GEMMA4_SPECIAL_TOKEN_IDS.values())) == len(GEMMA4_SPECIAL_TOKEN_IDS)
    assert len(set(GEMMA3_SPECIAL_TOKEN_IDS.values())) == len(GEMMA3_SPECIAL_TOKEN_IDS)
    with pytest.raises(ValueError, match="unknown chat family"):
        ChatFormat("llama")


def test_checkpoint_template_is_preferred(tmp_path):
    messages = [{"role": "user", "content": "hi"}]
    assert ChatFormat.for_checkpoint("gemma4", tmp_path).template is None
    builtin = ChatFormat.for_checkpoint("gemma4", tmp_path).render(messages)
    assert builtin == "<bos><|turn>user\nhi<turn|>\n<|turn>model\n"
    (tmp_path / "chat_template.jinja").write_text(GEMMA4_SOURCE)
    fmt = ChatFormat.for_checkpoint("gemma4", tmp_path)
    assert fmt.render(messages).endswith("<|turn>model\n<|channel>thought\n<channel|>")


def test_openai_inputs_are_normalized():
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Look"}, {"type": "image_url", "image_url": {"url": "u"}},
                                     {"type": "input_audio", "input_audio": {}}]},
        {"role": "assistant", "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": json.dumps({"b": [1], "a": "x"})}},
            {"id": "2", "type": "function", "function": {"name": "g", "arguments": "not json"}},
        ]},
    ]
    normalized = normalize_messages(messages)
    assert [part["type"] for part in normalized[0]["content"]] == ["text", "image", "audio"]
    assert normalized[1]["tool_calls"][0]["function"]["arguments"] == {"b": [1], "a": "x"}
    assert normalized[1]["tool_calls"][1]["function"]["arguments"] == "not json"
    assert messages[1]["tool_calls"][0]["function"]["arguments"].startswith("{")  # caller's data untouched
    prompt = ChatFormat("gemma4").render(messages)
    assert "<|turn>user\nLook<|image|><|audio|><turn|>" in prompt
    assert '<|tool_call>call:f{a:<|"|>x<|"|>,b:[1]}<tool_call|><|tool_call>call:g{not json}<tool_call|>' in prompt


def test_render_then_parse_round_trip():
    fmt = ChatFormat("gemma4", empty_thought_when_not_thinking=True)
    prompt = fmt.render([{"role": "user", "content": "Weather?"}], [{"name": "get_weather"}])
    assert prompt.endswith("<|turn>model\n<|channel>thought\n<channel|>")
    turn = fmt.parse('<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>}<tool_call|><|tool_response>', prompt=prompt)
    assert turn.tool_calls == [ToolCall("get_weather", {"city": "Oslo"})] and turn.reasoning == ""


def test_chat_package_stays_free_of_torch_and_the_model():
    """Data flows prompt -> chat -> tokenizer -> engine: chat works on strings and JSON values only."""
    package = Path(gemma4.chat.__file__).parent
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            else:
                continue
            for name in names:
                assert name.split(".")[0] != "torch" and not name.startswith(("gemma4.model", "gemma4.engine")), path

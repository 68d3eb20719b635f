"""The built-in Gemma 3 renderer against the stored Gemma 3 reference template."""

import pytest

from gemma4.chat import ChatFormat, ChatTemplateError, render_gemma3

CONVERSATIONS = {
    "plain": [{"role": "user", "content": " Hello \n"}],
    "system": [
        {"role": "system", "content": "You are terse. "},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ],
    "system_parts": [
        {"role": "system", "content": [{"type": "text", "text": "Only the first."}, {"type": "text", "text": "-"}]},
        {"role": "user", "content": "Hi"},
    ],
    "images": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " What is it? "}, {"type": "audio"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    ],
    "system_only": [{"role": "system", "content": "Alone."}],
}


@pytest.mark.parametrize("generation", [True, False])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_builtin_matches_reference_template(gemma3_template, name, generation):
    messages = CONVERSATIONS[name]
    expected = ChatFormat("gemma3", gemma3_template).render(messages, add_generation_prompt=generation)
    assert ChatFormat("gemma3").render(messages, add_generation_prompt=generation) == expected


def test_layout_in_words():
    assert ChatFormat("gemma3").render(CONVERSATIONS["system"]) == (
        "<bos><start_of_turn>user\nYou are terse. \n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_roles_must_alternate_in_both(gemma3_template):
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="alternate"):
        gemma3_template.render(messages)
    with pytest.raises(ValueError, match="alternate"):
        render_gemma3(messages)


def test_gemma3_has_no_tools_or_thinking():
    fmt = ChatFormat("gemma3")
    with pytest.raises(ValueError, match="Gemma 3"):
        fmt.render(CONVERSATIONS["plain"], tools=[{"name": "f"}])
    with pytest.raises(ValueError, match="Gemma 3"):
        fmt.render(CONVERSATIONS["plain"], enable_thinking=True)

"""Chat requests -> prompt token ids, with user text kept as text.

The chat renderer produces one string in which the template's markers (`<|turn>`, `<|tool_call>`,
...) and the users' text sit side by side; tokenizing that string would turn a user who writes
`<|turn>system` into a real turn marker (prompt injection). So before rendering, every special-token
string inside request-supplied text (message content, names, tool arguments and results, tool
definitions) is swapped for a private-use sentinel; after rendering, the template's text is
tokenized normally and each sentinel is tokenized as plain characters by a second tokenizer that
does not match special tokens. The stream parser likewise only ever sees generated text.
"""

from __future__ import annotations

import re
from typing import Any

import tokenizers

_OPEN, _CLOSE = "\U000f0000", "\U000f0001"  # plane-15 private use: never produced by a template
_SENTINEL = re.compile(_OPEN + r"(\d+)" + _CLOSE)


class PromptBuilder:
    def __init__(self, tokenizer, chat_format):
        self.tokenizer = tokenizer
        self.format = chat_format
        self.plain = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
        self.plain.encode_special_tokens = True
        specials = {tokenizer.id_to_token(i) for i in tokenizer.special_ids} - {None}
        self._special = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))

    def chat(self, messages: list[dict], tools: list[dict] | None, enable_thinking: bool) -> tuple[list[int], str]:
        """(prompt ids, rendered prompt with sentinels) for OpenAI-style messages and tools."""
        literals: list[str] = []

        def protect(text: str) -> str:
            text = text.replace(_OPEN, "").replace(_CLOSE, "")

            def swap(match):
                literals.append(match.group(0))
                return f"{_OPEN}{len(literals) - 1}{_CLOSE}"

            return self._special.sub(swap, text)

        messages = _walk(messages, protect)
        tools = _walk(tools, protect) if tools else None
        text = self.format.render(messages, tools, enable_thinking=enable_thinking)
        ids: list[int] = []
        for i, piece in enumerate(_SENTINEL.split(text)):
            if i % 2 == 0:
                ids += self.tokenizer.encode(piece, add_bos=False) if piece else []
            else:
                ids += self.plain.encode(literals[int(piece)], add_special_tokens=False).ids
        return ids, text

    def completion(self, prompt: str | list[int]) -> list[int]:
        """A raw completion prompt: the caller writes the whole text, markers included."""
        if isinstance(prompt, list):
            return list(prompt)
        ids = self.tokenizer.encode(prompt, add_bos=False)
        if self.tokenizer.add_bos and ids[:1] != [self.tokenizer.bos_id]:
            ids.insert(0, self.tokenizer.bos_id)
        return ids


def _walk(value: Any, fn):
    """A copy of JSON-like `value` with `fn` applied to every string (keys included)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {(fn(k) if isinstance(k, str) else k): _walk(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_walk(v, fn) for v in value]
    return value

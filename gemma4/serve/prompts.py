"""Chat requests -> prompt token ids, with user text kept as text, and the context checked early.

The chat renderer produces one string in which the template's markers (`<|turn>`, `<|tool_call>`,
...) and the users' text sit side by side; tokenizing that string would turn a user who writes
`<|turn>system` into a real turn marker (prompt injection). So before rendering, every special-token
string inside request-supplied text (message content, names, tool arguments and results, tool
definitions) is swapped for a private-use sentinel; after rendering, the template's text is
tokenized normally and each sentinel is tokenized as plain characters by a second tokenizer that
does not match special tokens. The stream parser likewise only ever sees generated text.

A prompt is the one part of a request whose cost grows with the body (4 MB of text is seconds of
tokenizing and a list of millions of ids), so
- a text longer than the `context` times the longest vocabulary entry cannot fit, whatever it says,
  and is refused before tokenizing (`PromptTooLong(exact=False)`, a lower bound). This holds when
  the tokenizer's normalizer never shortens text (Gemma's only swaps " " for "▁"); otherwise the
  check is skipped. Any shorter text costs no more than a prompt that fits, and is counted exactly;
- tokenizing uses `encode_batch_fast`, which releases the GIL, so other requests keep being served
  meanwhile, and the count is checked against `limit` before the ids become a Python list.
"""

from __future__ import annotations

import json
import re
from typing import Any

import tokenizers

_OPEN, _CLOSE = "\U000f0000", "\U000f0001"  # plane-15 private use: never produced by a template
_SENTINEL = re.compile(_OPEN + r"(\d+)" + _CLOSE)


class PromptTooLong(Exception):
    """The prompt has more than `limit` tokens: `tokens` of them (`exact`), or at least that many."""

    def __init__(self, tokens: int, exact: bool):
        super().__init__(f"{'' if exact else 'at least '}{tokens} prompt tokens")
        self.tokens, self.exact = tokens, exact


class PromptBuilder:
    def __init__(self, tokenizer, chat_format):
        self.tokenizer = tokenizer
        self.format = chat_format
        backend = tokenizer.backend
        self.plain = tokenizers.Tokenizer.from_str(backend.to_str())
        self.plain.encode_special_tokens = True
        specials = {tokenizer.id_to_token(i) for i in tokenizer.special_ids} - {None}
        self._special = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
        # Characters of input one token covers at most; None when the normalizer may shorten text.
        self.max_token_chars = max(map(len, backend.get_vocab())) if _keeps_length(backend.normalizer) else None

    def chat(self, messages: list[dict], tools: list[dict] | None, enable_thinking: bool,
             limit: int | None = None, context: int | None = None) -> tuple[list[int], str]:
        """(prompt ids, rendered prompt with sentinels) for OpenAI-style messages and tools;
        PromptTooLong when the prompt has more than `limit` tokens, or its length alone shows that
        it has more than `context`."""
        text, literals = self.render(messages, tools, enable_thinking)
        return self.encode(text, literals, limit, context), text

    def render(self, messages: list[dict], tools: list[dict] | None, enable_thinking: bool) -> tuple[str, list[str]]:
        """The rendered prompt, special tokens typed by users replaced by sentinels, and those literals
        (they are encoded as plain text, so a user cannot write a turn marker or an image placeholder)."""
        literals: list[str] = []

        def protect(text: str) -> str:
            text = text.replace(_OPEN, "").replace(_CLOSE, "")

            def swap(match):
                literals.append(match.group(0))
                return f"{_OPEN}{len(literals) - 1}{_CLOSE}"

            return self._special.sub(swap, text)

        messages = _walk(messages, protect)
        tools = _walk(tools, protect) if tools else None
        return self.format.render(messages, tools, enable_thinking=enable_thinking), literals

    def encode(self, text: str, literals: list[str], limit: int | None = None, context: int | None = None) -> list[int]:
        """Ids of a rendered prompt from `render` (after any expansion of its media placeholders)."""
        pieces = _SENTINEL.split(text)  # template text, literal index, template text, ...
        texts, kept = pieces[0::2], [literals[int(i)] for i in pieces[1::2]]
        self._check_length(sum(map(len, texts)), len(kept), context)
        encoded = self.tokenizer.backend.encode_batch_fast(texts, add_special_tokens=False)
        plain = self.plain.encode_batch_fast(kept, add_special_tokens=False) if kept else []
        self._check_count(sum(map(len, encoded)) + sum(map(len, plain)), limit)
        ids: list[int] = []
        for i, enc in enumerate(encoded):
            ids += enc.ids
            if i < len(plain):
                ids += plain[i].ids
        return ids

    def completion(self, prompt: str | list[int], limit: int | None = None, context: int | None = None) -> list[int]:
        """A raw completion prompt: the caller writes the whole text, markers included (`limit` and
        `context` as for `chat`)."""
        if isinstance(prompt, list):
            self._check_count(len(prompt), limit)
            return list(prompt)
        self._check_length(len(prompt), 0, context)
        encoding = self.tokenizer.backend.encode_batch_fast([prompt], add_special_tokens=False)[0]
        self._check_count(len(encoding), limit)
        ids = encoding.ids
        if self.tokenizer.add_bos and ids[:1] != [self.tokenizer.bos_id]:
            ids.insert(0, self.tokenizer.bos_id)
            self._check_count(len(ids), limit)
        return ids

    def _check_length(self, chars: int, literals: int, context: int | None) -> None:
        """Refuse by length alone: each literal is at least one token, and `chars` of other text at
        least chars / max_token_chars."""
        if context is not None and self.max_token_chars:
            at_least = -(-chars // self.max_token_chars) + literals
            if at_least > context:
                raise PromptTooLong(at_least, exact=False)

    @staticmethod
    def _check_count(tokens: int, limit: int | None) -> None:
        if limit is not None and tokens > limit:
            raise PromptTooLong(tokens, exact=True)


def _keeps_length(normalizer) -> bool:
    """Whether `normalizer` can only lengthen text (None, Prepend, Replace of a string by one at least
    as long, or a Sequence of those)."""
    if normalizer is None:
        return True

    def ok(spec: dict) -> bool:
        kind = spec.get("type")
        if kind == "Sequence":
            return all(ok(s) for s in spec.get("normalizers", []))
        if kind == "Replace":
            pattern = spec.get("pattern", {})
            return "String" in pattern and len(spec.get("content", "")) >= len(pattern["String"])
        return kind == "Prepend"

    return ok(json.loads(normalizer.__getstate__()))


def _walk(value: Any, fn):
    """A copy of JSON-like `value` with `fn` applied to every string (keys included)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {(fn(k) if isinstance(k, str) else k): _walk(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_walk(v, fn) for v in value]
    return value

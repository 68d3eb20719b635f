"""Training data: JSONL -> token ids with a loss mask -> length-bucketed, padded batches.

Two line formats:
- chat: `{"messages": [...], "tools": [...]?}` with system/user/assistant/tool turns (OpenAI style).
  Only assistant tokens carry loss: for each assistant message the prompt the model would see at
  inference (the conversation before it, rendered with the generation prompt) is encoded, then the
  message itself (up to and including its end-of-turn / tool-call marker) is encoded and trained on.
  Encoding the prompt and the answer separately is what generation does too, so training sees the
  same token boundaries as inference.
- text: `{"text": "..."}`, trained on every token: `<bos> text <eos>`.

Bad lines (not JSON, no assistant turn, unrenderable, longer than `max_length` tokens) are
reported with their file and line number, then skipped or refused (`on_bad_data`); blank lines
are not data and are passed over.

Why bucketing and not packing: the model's attention masks come from token positions, so two
documents packed in one row would either see each other or (with positions restarting at 0)
break causality. Sequences of similar length are batched together instead, padded on the right
with position -1, which the mask already excludes.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..chat import ChatTemplateError

log = logging.getLogger(__name__)

IGNORE = -100  # target id that carries no loss (F.cross_entropy's ignore_index)


class DataError(ValueError):
    """A training file with a line that cannot be used (and on_bad_data='error')."""


@dataclass
class Example:
    """One training sequence: ids, and which of them are predicted targets (mask[0] is always False)."""

    ids: list[int]
    mask: list[bool]
    source: str = ""  # "file:line", for messages

    @property
    def num_targets(self) -> int:
        return sum(self.mask)

    def __len__(self) -> int:
        return len(self.ids)


class BadSample(ValueError):
    """Why one line was rejected (caught by `read_jsonl` and reported with the line number)."""


def _lcp(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def chat_segments(chat_format, messages: Sequence[dict], tools: Sequence[Any] | None) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, trained) pieces; trained pieces are assistant turns."""
    if not isinstance(messages, list) or not messages:
        raise BadSample("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool", "developer"):
            raise BadSample(f"message {i} has no valid role (system/user/assistant/tool)")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadSample("the conversation has no assistant turn, so nothing to learn from")
    try:
        full = chat_format.render(messages, tools, add_generation_prompt=False)
        pieces: list[tuple[str, bool]] = []
        done = 0  # characters of `full` already assigned
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = chat_format.render(messages[:k], tools, add_generation_prompt=True) if k else ""
            upto = chat_format.render(messages[: k + 1], tools, add_generation_prompt=False)
            # Templates render prefixes of a conversation as prefixes of its text; where a generation
            # prompt deviates (e.g. after a tool response, inside the same model turn) the common
            # prefix marks where the answer starts.
            start, end = _lcp(prompt, full), _lcp(upto, full)
            if end < len(upto) or start < done or end <= start:
                raise BadSample(f"the chat template does not render assistant message {k} as a stable prefix")
            pieces += [(full[done:start], False), (full[start:end], True)]
            done = end
        pieces.append((full[done:], False))
    except BadSample:
        raise
    except (ChatTemplateError, ValueError, TypeError, KeyError) as e:  # the renderer's complaint about it
        raise BadSample(f"cannot render the conversation: {e}") from None
    return [(t, trained) for t, trained in pieces if t]


def encode_chat(encode: Callable[[str], list[int]], pieces: Iterable[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    ids: list[int] = []
    mask: list[bool] = []
    for text, trained in pieces:
        piece = encode(text)
        ids += piece
        mask += [trained] * len(piece)
    if mask:
        mask[0] = False  # nothing predicts the first token
    return ids, mask


def encode_line(obj: Any, tokenizer, chat_format) -> tuple[list[int], list[bool]]:
    """One parsed JSONL object -> (ids, mask); raises BadSample."""
    encode = _encoder(tokenizer)
    if not isinstance(obj, dict):
        raise BadSample(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        tools = obj.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise BadSample("'tools' must be a list")
        ids, mask = encode_chat(encode, chat_segments(chat_format, obj["messages"], tools))
    elif "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise BadSample("'text' must be a non-empty string")
        ids = [tokenizer.bos_id, *encode(obj["text"]), tokenizer.eos_id]
        mask = [False] + [True] * (len(ids) - 1)
    else:
        raise BadSample("a line needs 'messages' (chat) or 'text' (plain text)")
    if not any(mask):
        raise BadSample("no assistant tokens to train on")
    return ids, mask


def _encoder(tokenizer) -> Callable[[str], list[int]]:
    """Text -> ids without an added BOS (rendered chats write `<bos>` themselves)."""
    return lambda text: tokenizer.encode(text, add_bos=False)


def read_jsonl(
    path: str | Path,
    tokenizer,
    chat_format,
    *,
    max_length: int,
    on_bad_data: str = "error",
    report: Callable[[str], None] | None = None,
) -> list[Example]:
    """Read and tokenize a JSONL file; each bad line is reported, then skipped or raised."""
    if on_bad_data not in ("skip", "error"):
        raise ValueError(f"on_bad_data must be 'skip' or 'error', not {on_bad_data!r}")
    report = report or log.warning
    path = Path(path)
    examples: list[Example] = []
    bad = 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BadSample(f"not valid JSON ({e.msg} at column {e.colno})") from None
                ids, mask = encode_line(obj, tokenizer, chat_format)
                if len(ids) > max_length:
                    raise BadSample(f"{len(ids)} tokens, longer than the limit of {max_length} (--max-length)")
            except BadSample as e:
                if on_bad_data == "error":
                    raise DataError(f"{where}: {e} (pass --on-bad-data skip to skip such lines)") from None
                report(f"{where}: skipped: {e}")
                bad += 1
                continue
            examples.append(Example(ids, mask, where))
    if bad:
        report(f"{path}: skipped {bad} bad line(s), kept {len(examples)}")
    if not examples:
        raise DataError(f"{path} has no usable training example")
    return examples


# ------------------------------------------------------------------------------------------------
# Batching


@dataclass
class Batch:
    """Right-padded ids [B, T], positions [B, T] (-1 at padding) and targets [B, T] (IGNORE = no loss).

    targets[b, t] is the id that position t should predict (ids[b, t+1]) where that token is trained.
    """

    ids: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE).sum())

    @property
    def num_tokens(self) -> int:
        return int((self.positions >= 0).sum())

    def to(self, device) -> Batch:
        return Batch(self.ids.to(device), self.positions.to(device), self.targets.to(device))


def collate(examples: Sequence[Example], pad_id: int = 0) -> Batch:
    T = max(len(e) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    positions = torch.full((B, T), -1, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e)
        ids[b, :n] = torch.tensor(e.ids)
        positions[b, :n] = torch.arange(n)
        nxt = torch.tensor(e.ids[1:])
        trained = torch.tensor(e.mask[1:], dtype=torch.bool)
        targets[b, : n - 1] = torch.where(trained, nxt, IGNORE)
    return Batch(ids, positions, targets)


def epoch_batches(lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int,
                  bucket: int = 16) -> list[list[int]]:
    """Indices grouped into batches of `batch_size` sequences of similar length, in a seeded order.

    The data is shuffled, cut into windows of `bucket` batches, sorted by length within each window
    (so padding stays small while batches still mix), and the batches are shuffled again.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * bucket
    batches: list[list[int]] = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches

"""Training data: which tokens carry loss, bad-line reporting, bucketing."""

from __future__ import annotations

import json

import pytest
from train_helpers import tiny_tokenizer

from gemma4.chat import ChatFormat
from gemma4.train import DataError, Example, collate, read_jsonl
from gemma4.train.data import IGNORE, encode_line, epoch_batches

SYSTEM = "you swap words ."
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "swap c f"},
    {"role": "assistant", "content": "f c"},
    {"role": "user", "content": "please swap a b"},
    {"role": "assistant", "content": "b a"},
]


def trained_ids(ids, mask):
    return [i for i, m in zip(ids, mask) if m]


@pytest.mark.parametrize("family,end", [("gemma4", "<turn|>"), ("gemma3", "<end_of_turn>")])
def test_only_assistant_tokens_carry_loss(family, end):
    tok = tiny_tokenizer()
    ids, mask = encode_line({"messages": CONVERSATION}, tok, ChatFormat(family))
    # Exactly the two answers, each with its end-of-turn marker (so the model learns to stop).
    assert trained_ids(ids, mask) == tok.encode(f"f c {end} b a {end}", add_bos=False)
    untrained = {i for i, m in zip(ids, mask) if not m}
    for word in ("you", "swap", "words", "please", "user", "system", "model"):
        if word == "system" and family == "gemma3":
            continue  # Gemma 3 has no system turn: its text goes into the first user turn
        assert tok.token_to_id(word) in untrained
    assert ids[0] == tok.bos_id and not mask[0]
    # In a batch, every position whose next token is system/user text is ignored.
    batch = collate([Example(ids, mask)])
    targets = batch.targets[0].tolist()
    assert [t for t in targets if t != IGNORE] == trained_ids(ids, mask)


def test_tool_turns_train_the_call_not_the_result():
    tok = tiny_tokenizer()
    messages = [
        {"role": "user", "content": "weather in paris ?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "weather", "arguments": json.dumps({"in": "paris"})}}]},
        {"role": "tool", "name": "weather", "content": "value 9"},
        {"role": "assistant", "content": "it is 9"},
    ]
    tools = [{"type": "function", "function": {"name": "weather", "description": "the weather",
                                               "parameters": {"type": "object", "properties": {}}}}]
    ids, mask = encode_line({"messages": messages, "tools": tools}, tok, ChatFormat("gemma4"))
    trained = trained_ids(ids, mask)
    call = tok.encode('<|tool_call> call : weather { in : <|"|> paris <|"|> } <tool_call|> <|tool_response>',
                      add_bos=False)
    assert trained == call + tok.encode("it is 9 <turn|>", add_bos=False)
    assert tok.token_to_id("value") in {i for i, m in zip(ids, mask) if not m}  # the tool's result


def test_bad_lines_are_reported_with_line_numbers(tmp_path):
    tok = tiny_tokenizer()
    good = json.dumps({"messages": CONVERSATION})
    lines = [
        good,                                                              # 1
        "{not json",                                                       # 2
        json.dumps({"messages": CONVERSATION[:2]}),                        # 3: no assistant turn
        json.dumps({"text": " ".join(["a"] * 100)}),                       # 4: too long
        "",                                                                # 5: blank, not data
        json.dumps({"text": "it is the weather"}),                         # 6
        json.dumps({"messages": CONVERSATION, "tools": "weather"}),        # 7: tools not a list
        json.dumps({"prompt": "x"}),                                       # 8: unknown format
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    reports: list[str] = []
    examples = read_jsonl(path, tok, ChatFormat("gemma4"), max_length=40, on_bad_data="skip",
                          report=reports.append)
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:6"]
    assert [r.split(": skipped")[0] for r in reports[:-1]] == [f"{path}:{n}" for n in (2, 3, 4, 7, 8)]
    assert "not valid JSON" in reports[0] and "no assistant turn" in reports[1] and "longer than" in reports[2]
    assert "skipped 5 bad line(s), kept 2" in reports[-1]
    text = examples[1]
    assert text.ids[0] == tok.bos_id and text.ids[-1] == tok.eos_id and text.mask == [False] + [True] * 5

    with pytest.raises(DataError, match=r"train\.jsonl:2: not valid JSON .*--on-bad-data skip"):
        read_jsonl(path, tok, ChatFormat("gemma4"), max_length=40, on_bad_data="error")
    # Gemma 3 has no tool syntax: a tool conversation is bad data for it, reported, not mangled.
    with pytest.raises(DataError, match="cannot render"):
        read_jsonl_lines(tmp_path, [json.dumps({"messages": CONVERSATION, "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]})], "gemma3")


def read_jsonl_lines(tmp_path, lines, family):
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join(lines))
    return read_jsonl(path, tiny_tokenizer(), ChatFormat(family), max_length=1000)


def test_length_buckets_cover_everything_once():
    lengths = [(i * 37) % 101 + 5 for i in range(200)]
    batches = epoch_batches(lengths, 8, seed=0, epoch=0, bucket=4)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(200)) and all(len(b) == 8 for b in batches)

    def spread(bs):
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in bs) / len(bs)

    # Similar lengths are batched together: far less padding than unsorted batches (bucket=1).
    assert spread(batches) < 0.5 * spread(epoch_batches(lengths, 8, seed=0, epoch=0, bucket=1))
    assert batches == epoch_batches(lengths, 8, seed=0, epoch=0, bucket=4)
    assert batches != epoch_batches(lengths, 8, seed=0, epoch=1, bucket=4)

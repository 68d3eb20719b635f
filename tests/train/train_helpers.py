"""Helpers for the training tests: tiny checkpoints (random transformers weights, saved once per
session, read through our loader) and a tiny word-level tokenizer whose ids fit the tiny variants'
128-entry vocabulary."""

from __future__ import annotations

import atexit
import json
import shutil
import string
import tempfile
from pathlib import Path

import tokenizers
from testing_utils import hf_model
from tokenizers import models, pre_tokenizers

from gemma4.tokenizer import Tokenizer
from gemma4.weights import load_model

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<|turn>", "<turn|>",
            "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>', "<|tool>", "<tool|>",
            "<|channel>", "<channel|>"]
WORDS = ["system", "user", "model", "you", "swap", "words", "answer", "please", "call", "response",
         "declaration", "value", "it", "is", "the", "weather", "in", "paris", "thanks", "welcome"]
PUNCT = list("{}[]():,.?!='\"_-<>|/")
VOCAB = SPECIALS + WORDS + list(string.digits) + list(string.ascii_lowercase) + PUNCT


def tiny_tokenizer() -> Tokenizer:
    assert len(VOCAB) <= 128
    vocab = {t: i for i, t in enumerate(VOCAB)}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return Tokenizer(tok, add_bos=False)


def save_tokenizer(directory: Path) -> None:
    tiny_tokenizer().backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))


_ROOT = Path(tempfile.mkdtemp(prefix="gemma4-train-tests-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


def tiny_dir(name: str) -> Path:
    """A checkpoint directory of a tiny variant (HF layout, random weights, tiny tokenizer), made once."""
    d = _ROOT / name
    if not d.is_dir():
        hf_model(name).save_pretrained(d)
        save_tokenizer(d)
    return d


def tiny(name: str):
    """(our model loaded from the tiny checkpoint, tokenizer)."""
    return load_model(tiny_dir(name)), tiny_tokenizer()

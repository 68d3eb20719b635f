"""Reference templates installed as checkpoint directories, loaded through the production loader."""

import json
from pathlib import Path

import pytest
from chat_cases import EMPTY_THOUGHT_LINES, GEMMA3_SOURCE, GEMMA4_SOURCE

from gemma4.chat import ChatTemplate, load_chat_template


def _checkpoint(directory: Path, files: dict[str, str]) -> ChatTemplate:
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    template = load_chat_template(directory)
    assert template is not None
    return template


@pytest.fixture(scope="session")
def gemma4_template(tmp_path_factory) -> ChatTemplate:
    """The 26B/31B-style reference, as `chat_template.jinja` in a checkpoint directory."""
    return _checkpoint(tmp_path_factory.mktemp("gemma4"), {"chat_template.jinja": GEMMA4_SOURCE})


@pytest.fixture(scope="session")
def gemma4_small_template(tmp_path_factory) -> ChatTemplate:
    """The same revision without the empty thought block (E2B/E4B style)."""
    assert EMPTY_THOUGHT_LINES in GEMMA4_SOURCE
    source = GEMMA4_SOURCE.replace(EMPTY_THOUGHT_LINES, "")
    return _checkpoint(tmp_path_factory.mktemp("gemma4_small"), {"chat_template.jinja": source})


@pytest.fixture(scope="session")
def gemma3_template(tmp_path_factory) -> ChatTemplate:
    """The Gemma 3 reference, in `tokenizer_config.json` as Gemma 3 checkpoints ship it."""
    config = {"chat_template": GEMMA3_SOURCE, "bos_token": "<bos>", "eos_token": "<eos>"}
    return _checkpoint(tmp_path_factory.mktemp("gemma3"), {"tokenizer_config.json": json.dumps(config)})

"""Structured output always terminates: open-ended numbers and strings of a JSON schema are
bounded (a number field once ran to max_tokens writing zeros, never closing the JSON)."""

import json

import pytest
from serve_helpers import tiny_tokenizer

from gemma4.serve.structured import MAX_STRING, Grammars, bounded
from gemma4.tokenizer import Tokenizer

SCHEMA = {"type": "object", "properties": {"x": {"type": "number"}, "n": {"type": "integer"},
                                           "s": {"type": "string"}}, "required": ["x", "n", "s"]}


@pytest.fixture(scope="module")
def grammars():
    tok = Tokenizer(tiny_tokenizer(), add_bos=False)
    return tok, Grammars(tok, 384, {tok.token_to_id("<eos>")})


def accepts(grammars, schema, text: str) -> bool:
    tok, g = grammars
    constraint = g.json(schema)()
    for i in tok.encode(text, add_bos=False):
        if not constraint.allowed()[i]:
            return False
        constraint.advance(i)
    return True


@pytest.mark.parametrize("schema", [SCHEMA, None], ids=["json_schema", "json_object"])
def test_open_numbers_and_strings_are_bounded(grammars, schema):
    assert accepts(grammars, schema, '{"x": -2.5, "n": 12, "s": "ok"}')
    assert not accepts(grammars, schema, '{"x": 1.' + "0" * 30)  # at most 6 decimals
    assert not accepts(grammars, schema, '{"x": 1' + "0" * 30)  # |x| <= 10**15
    assert not accepts(grammars, schema, '{"x": 1, "n": 1' + "0" * 30)
    assert not accepts(grammars, schema, '{"x": 1, "n": 2, "s": "' + "a" * (MAX_STRING + 1))


def test_a_schema_keeps_its_own_bounds():
    own = {"type": "object", "properties": {"p": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.25},
                                            "c": {"enum": ["a", "b"]}, "s": {"type": "string", "maxLength": 3}}}
    assert bounded(own) == json.loads(json.dumps(own))

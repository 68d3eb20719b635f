"""Token masks for structured output, tool choice and thinking budgets (engine `Constraint`s).

JSON output (`response_format` json_object / json_schema) and forced tool calls (`tool_choice`
"required" or a named function) are compiled by llguidance, a maintained grammar library (JSON
schema and Lark in, token bitmask per step out), never by a hand-written matcher. The schema is
first checked with `jsonschema` and bounded in size and depth; llguidance then compiles it under
its own fuel limits, so a hostile schema or regex is an error, not a hang. Compiling runs off the
event loop. The llguidance tokenizer is built once, from the served tokenizer's JSON, with the
served stop ids as its end-of-sequence tokens.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import torch

from .errors import bad_request

MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 32
_LIMITS = dict(initial_lexer_fuel=2_000_000, step_lexer_fuel=400_000, max_grammar_size=200_000,
               max_lexer_states=50_000, verbose_errors=False)


class BanTokens:
    """Never sample these ids (e.g. `<|tool_call>` under tool_choice "none")."""

    def __init__(self, ids, vocab: int):
        self.mask = torch.ones(vocab, dtype=torch.bool)
        self.mask[list(ids)] = False

    def allowed(self):
        return self.mask

    def advance(self, token: int) -> None:
        pass


class ThinkingBudget:
    """Closes the thought channel once it holds `budget` tokens, by forcing `close_id`."""

    def __init__(self, open_id: int, close_id: int, budget: int, vocab: int, *, starts_open: bool = False):
        self.open_id, self.close_id, self.budget = open_id, close_id, budget
        self.inside, self.count = starts_open, 0
        self.force = torch.zeros(vocab, dtype=torch.bool)
        self.force[close_id] = True

    def allowed(self):
        return self.force if self.inside and self.count >= self.budget else None

    def advance(self, token: int) -> None:
        if token == self.open_id:
            self.inside, self.count = True, 0
        elif token == self.close_id:
            self.inside = False
        elif self.inside:
            self.count += 1


class GrammarConstraint:
    """An llguidance matcher as an engine constraint: its bitmask each step, fed every token."""

    def __init__(self, matcher, vocab: int):
        self.matcher, self.vocab = matcher, vocab

    def allowed(self):
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        mask = torch.zeros(self.vocab, dtype=torch.bool)
        n = min(self.vocab, bits.size)
        mask[:n] = torch.from_numpy(bits[:n].astype(bool))
        return mask

    def advance(self, token: int) -> None:
        self.matcher.consume_token(token)


class Grammars:
    """Compiles grammars for one tokenizer; `json(...)` / `tool_call(...)` return a constraint factory."""

    def __init__(self, tokenizer, vocab: int, stop_ids):
        self.tokenizer, self.vocab, self.stop_ids = tokenizer, vocab, sorted(stop_ids)
        self._ll = None
        self._lock = threading.Lock()

    def _lltok(self):
        import llguidance

        with self._lock:
            if self._ll is None:
                n = max(self.vocab, self.tokenizer.vocab_size)
                self._ll = llguidance.LLTokenizer(self.tokenizer.backend.to_str(), n_vocab=n, eos_token=self.stop_ids)
            return self._ll

    def _compile(self, grammar: str, param: str):
        import llguidance

        tok = self._lltok()
        limits = llguidance.LLParserLimits(**_LIMITS)
        error = llguidance.LLMatcher.validate_grammar(grammar, tok, limits=limits)
        if error and not error.startswith("WARNING"):
            raise bad_request(f"{param}: the grammar cannot be compiled: {error[:300]}", param=param)

        def make():
            matcher = llguidance.LLMatcher(tok, grammar, log_level=0, limits=limits)
            if matcher.is_error():
                raise bad_request(f"{param}: {matcher.get_error()[:300]}", param=param)
            return GrammarConstraint(matcher, self.vocab)

        make()  # fail now, at validation time, rather than in the scheduler
        return make

    def json(self, schema: dict[str, Any] | None, param: str = "response_format"):
        """A factory of constraints for JSON output matching `schema` (any JSON object when None)."""
        import llguidance

        check_schema({"type": "object"} if schema is None else schema, param)
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                bounded(schema), defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        except ValueError as error:
            raise bad_request(f"{param}: unsupported JSON schema: {str(error)[:300]}", param=param) from None
        return self._compile(grammar, param)

    def tool_call(self, tools: list[dict[str, Any]], names: list[str], ids: dict[str, int]):
        """A factory of constraints forcing `<|tool_call>call:NAME{...}<tool_call|>` for one of `names`.

        Argument keys are limited to each function's declared properties; values follow the
        Gemma tool-value syntax (strings between `<|"|>` tokens, numbers, booleans, lists, objects).
        """
        by_name = {t["function"]["name"]: t["function"] for t in tools}
        rules, alts = [], []
        for i, name in enumerate(names):
            props = list(((by_name[name].get("parameters") or {}).get("properties") or {}).keys())
            key = " | ".join(json.dumps(p) for p in props) if props else "KEY"
            rules.append(f"args{i}: \"{{\" [pair{i} (\",\" pair{i})*] \"}}\"\npair{i}: ({key}) \":\" value")
            alts.append(f"{json.dumps(name)} args{i}")
        q = f"<[{ids['quote']}]>"
        lark = "\n".join([
            f"start: <[{ids['open']}]> \"call:\" call <[{ids['close']}]>",
            "call: " + " | ".join(alts),
            *rules,
            "value: string | NUMBER | \"true\" | \"false\" | obj | list",
            f"string: {q} STR {q}",
            "STR: /[^<]{0,512}/",
            "NUMBER: /-?(0|[1-9][0-9]{0,15})(\\.[0-9]{1,15})?/",
            "obj: \"{\" [KEY \":\" value (\",\" KEY \":\" value)*] \"}\"",
            "list: \"[\" [value (\",\" value)*] \"]\"",
            "KEY: /[A-Za-z_][A-Za-z0-9_]{0,63}/",
        ])
        import llguidance

        return self._compile(llguidance.LLMatcher.grammar_from_lark(lark), "tool_choice")


# A grammar leaves the model free to write `1.000000...` or a string for ever, never closing the
# JSON (a number field ran to max_tokens filling zeros). Open-ended values get bounds, so that a
# constrained reply can always end: a schema's own bounds are kept.
MAX_INTEGER = 10**15  # |integers| (and the integer part of numbers) without their own bounds
NUMBER_STEP = 1e-6  # numbers without their own multipleOf: at most 6 decimals
MAX_STRING = 1024  # characters of strings without maxLength (or enum, const, pattern, format)
_ANY = {"$defs": {"any": {"anyOf": [
    {"type": "null"}, {"type": "boolean"}, {"type": "integer"}, {"type": "number"}, {"type": "string"},
    {"type": "array", "items": {"$ref": "#/$defs/any"}},
    {"type": "object", "additionalProperties": {"$ref": "#/$defs/any"}}]}}}


def bounded(schema: dict[str, Any] | None) -> dict[str, Any]:
    """`schema` (None: any JSON object) with bounds on its open-ended numbers and strings."""
    if schema is None:
        schema = {"type": "object", "additionalProperties": {"$ref": "#/$defs/any"}, **_ANY}
    return _bound(schema)


def _bound(node: Any) -> Any:
    if isinstance(node, list):
        return [_bound(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: (v if k in ("enum", "const", "default", "examples") else _bound(v)) for k, v in node.items()}
    types = out.get("type")
    types = set(types) if isinstance(types, list) else {types}
    if "enum" in out or "const" in out:
        return out
    if types & {"integer", "number"}:
        if not any(k in out for k in ("maximum", "exclusiveMaximum")):
            out["maximum"] = MAX_INTEGER
        if not any(k in out for k in ("minimum", "exclusiveMinimum")):
            out["minimum"] = -MAX_INTEGER
        if "number" in types and "multipleOf" not in out:
            out["multipleOf"] = NUMBER_STEP
    if "string" in types and not any(k in out for k in ("maxLength", "pattern", "format")):
        out["maxLength"] = MAX_STRING
    return out


def check_schema(schema: Any, param: str) -> None:
    """Bounded size and depth, and a valid JSON Schema (Draft 2020-12 meta-schema)."""
    import jsonschema

    if not isinstance(schema, dict):
        raise bad_request(f"{param}: the schema must be a JSON object", param=param)
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise bad_request(f"{param}: the schema is larger than {MAX_SCHEMA_BYTES} bytes", param=param)
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise bad_request(f"{param}: the schema is nested deeper than {MAX_SCHEMA_DEPTH} levels", param=param)
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as error:
        raise bad_request(f"{param}: invalid JSON schema: {error.message[:300]}", param=param) from None


def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_SCHEMA_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level

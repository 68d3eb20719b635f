"""Tool declarations in Gemma 4 syntax, mirroring the reference template's macros.

`format_function_declaration` and `format_parameters` in the reference `chat_template.jinja` decide
what the model sees of a JSON schema. This module reproduces them output for output, quirks
included: `parameters:{` is closed only by its `type`, enums are written for strings only, an
object without `properties` lists its own non-standard keys as properties, and the keys inside
`items` go through the generic value writer (quoted keys, types upper-cased only at the top).
"""

from collections.abc import Mapping
from typing import Any

from . import _jinja as j
from .tokens import STRING_DELIM
from .tool_syntax import dictsort, format_value

_STANDARD_KEYS = ("description", "type", "properties", "required", "nullable")


def format_declaration(tool: Mapping[str, Any]) -> str:
    """`declaration:NAME{description:...,parameters:{...}}` for one tool in OpenAI form."""
    function = tool["function"]
    out = "declaration:" + j.text(j.get(function, "name"))
    out += "{description:" + _quote(j.text(j.get(function, "description")))
    params = j.get(function, "parameters")
    if j.truthy(params):
        out += ",parameters:{"
        if j.truthy(properties := j.get(params, "properties")):
            out += "properties:{" + _format_properties(properties) + "},"
        if j.truthy(required := j.get(params, "required")):
            out += "required:[" + _quoted_list(required) + "],"
        if j.truthy(params_type := j.get(params, "type")):
            out += "type:" + _quote(j.text(params_type).upper()) + "}"
    if "response" in function:
        response = function["response"]
        out += ",response:{"
        if j.truthy(description := j.get(response, "description")):
            out += "description:" + _quote(j.text(description)) + ","
        if (response_type := j.text(j.get(response, "type")).upper()) == "OBJECT":
            out += "type:" + _quote(response_type) + "}"
    return out + "}"


def _format_properties(properties: Mapping, *, skip_standard: bool = False) -> str:
    """The template's `format_parameters`: `name:{description:...,type:<|"|>STRING<|"|>},...`."""
    parts = []
    for key, value in dictsort(properties):
        if skip_standard and key in _STANDARD_KEYS:
            continue
        fields = []
        if j.truthy(description := j.get(value, "description")):
            fields.append("description:" + _quote(j.text(description)))
        value_type = j.text(j.get(value, "type")).upper()
        if value_type == "STRING":
            if j.truthy(enum := j.get(value, "enum")):
                fields.append("enum:" + format_value(enum, escape_keys=True))
        elif value_type == "ARRAY":
            items = j.get(value, "items")
            if isinstance(items, Mapping) and items:
                fields.append("items:{" + _format_items(items) + "}")
        if j.truthy(j.get(value, "nullable")):
            fields.append("nullable:true")
        if value_type == "OBJECT":
            nested = j.get(value, "properties")
            if isinstance(nested, Mapping):
                fields.append("properties:{" + _format_properties(nested) + "}")
            elif isinstance(value, Mapping):
                fields.append("properties:{" + _format_properties(value, skip_standard=True) + "}")
            if j.truthy(required := j.get(value, "required")):
                fields.append("required:[" + _quoted_list(required) + "]")
        fields.append("type:" + _quote(value_type))
        parts.append(key + ":{" + ",".join(fields) + "}")
    return ",".join(parts)


def _format_items(items: Mapping) -> str:
    """The `items:{...}` body of an array property."""
    parts = []
    for key, value in dictsort(items):
        if value is None:
            continue
        if key == "properties":
            parts.append("properties:{" + (_format_properties(value) if isinstance(value, Mapping) else "") + "}")
        elif key == "required":
            parts.append("required:[" + _quoted_list(value) + "]")
        elif key == "type":
            upper = value.upper() if isinstance(value, str) else [j.text(v).upper() for v in value]
            parts.append("type:" + format_value(upper))
        else:
            parts.append(key + ":" + format_value(value, escape_keys=True))
    return ",".join(parts)


def _quote(text: str) -> str:
    return STRING_DELIM + text + STRING_DELIM


def _quoted_list(items) -> str:
    return ",".join(_quote(j.text(item)) for item in items)

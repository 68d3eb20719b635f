"""Tool definitions: bring whatever callers pass as `tools` to the OpenAI function form.

Chat templates read `tool['function']['name' | 'description' | 'parameters']`, so every tool is
normalized to `{"type": "function", "function": {...}}` before rendering, whichever renderer runs.
Accepted: that form, a bare function dict (`{"name", "description", "parameters"}`, optionally with
`"type": "function"` as in the Responses API), or a Python function whose type hints and
Google-style docstring (`Args:` section) give the schema. Problems raise `ToolDefinitionError`
naming the tool and the offending part, instead of surfacing later as a template failure.
"""

import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from .tool_syntax import TOOL_NAME


class ToolDefinitionError(ValueError):
    """A tool definition that cannot be rendered."""


def normalize_tools(tools) -> list[dict[str, Any]] | None:
    """Each tool in OpenAI form; None when there are none (templates test `tools` for truth)."""
    if not tools:
        return None
    if isinstance(tools, (Mapping, str)) or callable(tools):
        raise ToolDefinitionError("`tools` must be a list of tools")
    normalized = [normalize_tool(tool) for tool in tools]
    names = [tool["function"]["name"] for tool in normalized]
    if duplicates := sorted({name for name in names if names.count(name) > 1}):
        raise ToolDefinitionError(f"tool names must be unique; repeated: {duplicates}")
    return normalized


def normalize_tool(tool) -> dict[str, Any]:
    """One tool (OpenAI dict, bare function dict or Python function) in OpenAI form."""
    if callable(tool) and not isinstance(tool, Mapping):
        return function_tool(tool)
    if not isinstance(tool, Mapping):
        raise ToolDefinitionError(f"a tool must be a dict or a function, got {type(tool).__name__}")
    if "function" in tool:
        if tool.get("type", "function") != "function":
            raise ToolDefinitionError(f"only function tools are supported, got type {tool.get('type')!r}")
        function = tool["function"]
    else:
        function = {key: value for key, value in tool.items() if key != "type"}
    _check_function(function)
    return {"type": "function", "function": dict(function)}


def _check_function(function) -> None:
    if not isinstance(function, Mapping):
        raise ToolDefinitionError(f"a tool's 'function' must be a dict, got {type(function).__name__}")
    name = function.get("name")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise ToolDefinitionError(f"tool name {name!r} must be a non-empty string without spaces or brackets")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise ToolDefinitionError(f"tool {name!r}: description must be a string")
    if function.get("parameters") is not None:
        _check_schema(function["parameters"], f"tool {name!r} parameters")


def _check_schema(schema, where: str) -> None:
    """The parts of a JSON schema the template walks: object-valued properties/items, string lists."""
    if not isinstance(schema, Mapping):
        raise ToolDefinitionError(f"{where} must be a JSON schema object, got {type(schema).__name__}")
    schema_type = schema.get("type")
    type_names = schema_type if isinstance(schema_type, list) else [schema_type]
    if schema_type is not None and not all(isinstance(name, str) for name in type_names):
        raise ToolDefinitionError(f"{where}: 'type' must be a type name such as 'object', got {schema_type!r}")
    properties = schema.get("properties")
    if properties is not None:
        if not isinstance(properties, Mapping):
            raise ToolDefinitionError(f"{where}: 'properties' must map names to schemas")
        for key, value in properties.items():
            if not isinstance(key, str):
                raise ToolDefinitionError(f"{where}: property names must be strings, got {key!r}")
            _check_schema(value, f"{where}.{key}")
    required = schema.get("required")
    if required is not None:
        if not isinstance(required, list) or not all(isinstance(item, str) for item in required):
            raise ToolDefinitionError(f"{where}: 'required' must be a list of property names")
        if missing := [item for item in required if item not in (properties or {})]:
            raise ToolDefinitionError(f"{where}: required {missing} not among the properties")
    if schema.get("items") is not None:
        _check_schema(schema["items"], f"{where}[items]")


def function_tool(fn: Callable) -> dict[str, Any]:
    """An OpenAI-form tool from a Python function's signature, type hints and docstring."""
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise ToolDefinitionError(f"cannot use {fn!r} as a tool: it has no usable __name__")
    try:
        hints = typing.get_type_hints(fn)
        signature = inspect.signature(fn)
    except (NameError, TypeError, ValueError) as error:
        raise ToolDefinitionError(f"tool {name!r}: cannot read its signature: {error}") from error
    summary, arg_docs = parse_google_docstring(inspect.getdoc(fn) or "")
    properties: dict[str, Any] = {}
    required = []
    for param in signature.parameters.values():
        where = f"tool {name!r} parameter {param.name!r}"
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ToolDefinitionError(f"{where}: *args and **kwargs cannot be described to the model")
        if param.name not in hints:
            raise ToolDefinitionError(f"{where} has no type hint")
        schema = _schema_for(hints[param.name], where)
        if doc := arg_docs.get(param.name):
            schema["description"] = doc
        properties[param.name] = schema
        if param.default is param.empty:
            required.append(param.name)
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    function: dict[str, Any] = {"name": name}
    if summary:
        function["description"] = summary
    function["parameters"] = parameters
    return {"type": "function", "function": function}


_PRIMITIVES = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _schema_for(hint, where: str) -> dict[str, Any]:
    """JSON schema for a type hint: primitives, list/tuple, dict, Optional, Literal."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _PRIMITIVES:
        return {"type": _PRIMITIVES[hint]}
    if origin in (typing.Union, types.UnionType):
        others = [arg for arg in args if arg is not type(None)]
        if len(others) == 1 and len(args) == 2:
            return {**_schema_for(others[0], where), "nullable": True}
        raise ToolDefinitionError(f"{where}: unions other than Optional[X] are not supported ({hint!r})")
    if origin is typing.Literal:
        kinds = {type(value) for value in args}
        if len(kinds) != 1 or next(iter(kinds)) not in _PRIMITIVES:
            raise ToolDefinitionError(f"{where}: Literal values must share one of str/int/float/bool ({hint!r})")
        return {"type": _PRIMITIVES[kinds.pop()], "enum": list(args)}
    if hint in (list, tuple) or origin in (list, tuple):
        schema: dict[str, Any] = {"type": "array"}
        if origin is tuple and args and (len(args) != 2 or args[1] is not Ellipsis):
            raise ToolDefinitionError(f"{where}: only tuple[X, ...] is supported ({hint!r})")
        if args:
            schema["items"] = _schema_for(args[0], where)
        return schema
    if hint is dict or origin is dict:
        return {"type": "object"}
    raise ToolDefinitionError(f"{where}: unsupported type {hint!r}")


_SECTION = re.compile(r"([A-Z][A-Za-z ]*):\s*")
_ARG_LINE = re.compile(r"\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)")
_ARGS_SECTIONS = ("Args", "Arguments", "Parameters")


def parse_google_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(summary, {parameter: description}) from a dedented Google-style docstring.

    The summary is the text before the first section header (`Args:`, `Returns:`, ...); in the
    `Args:` section each `name (type): text` line starts a parameter and deeper-indented lines
    continue it.
    """
    summary: list[str] = []
    args: dict[str, str] = {}
    section, current, arg_indent = None, None, 0
    for line in doc.splitlines():
        stripped = line.strip()
        header = _SECTION.fullmatch(line)
        if header:
            section, current = ("args" if header.group(1) in _ARGS_SECTIONS else "other"), None
        elif section is None:
            summary.append(line)
        elif section == "args" and stripped:
            indent = len(line) - len(line.lstrip())
            match = _ARG_LINE.fullmatch(stripped)
            if match and (current is None or indent <= arg_indent):
                current, arg_indent = match.group(1), indent
                args[current] = match.group(2)
            elif current is not None:
                args[current] = (args[current] + " " + stripped).strip()
    return "\n".join(summary).strip(), args

"""Jinja semantics the built-in renderers copy from the reference templates.

The templates index dicts that may lack a key (Jinja yields an empty "undefined"), print values
with `{{ }}` (None prints as `None`, a missing value as nothing) and test truthiness. Mirroring
those rules keeps the Python renderers byte-identical to the templates on odd schemas too.
"""

from collections.abc import Mapping
from typing import Any

MISSING: Any = object()


def get(obj: Any, key: str) -> Any:
    """`obj[key]` as a template sees it: MISSING when obj is not a mapping or lacks the key."""
    return obj[key] if isinstance(obj, Mapping) and key in obj else MISSING


def text(value: Any) -> str:
    """What `{{ value }}` prints."""
    return "" if value is MISSING else str(value)


def truthy(value: Any) -> bool:
    return value is not MISSING and bool(value)

"""How error messages name types and values: one phrasing for config files and rules files.

Operators read these messages, not Python: ``expected an integer or null, got 'x'``, never a
class repr. Pure functions that import nothing from fsnotifyd, so every layer may use them.
"""

from __future__ import annotations

import datetime
from typing import Any

import yaml

# Why a table and not type.__name__: "NoneType" or "dict" mean nothing to someone editing YAML.
_NOUNS: dict[type, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean (true or false)",
    type(None): "null",
    list: "a list",
    tuple: "a list",
    dict: "a mapping",
}


def a(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def type_phrase(kinds: type | tuple[type, ...]) -> str:
    """``int`` -> "an integer"; ``(int, type(None))`` -> "an integer or null"."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if float in kinds:
        kinds = tuple(k for k in kinds if k is not int)  # "a number" already takes integers
    names = list(dict.fromkeys(_NOUNS.get(k) or a(k.__name__) for k in kinds))
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def describe(value: Any) -> str:
    """A value with its type, as rules errors show it: "a string ('x')"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, int):
        return f"an integer ({short(str(value))})"
    if isinstance(value, float):
        return f"a number ({short(repr(value))})"
    if isinstance(value, str):
        return f"a string ({short(repr(value))})"
    name = type(value).__name__
    if name in ("date", "datetime"):
        return f"a {name} ({value}; quote it to make it a string)"
    return a(name)


def yaml_value(value: Any) -> str:
    """A scalar as it would be written in YAML ("null", "true", "'x'"), for "got ..."."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return short(repr(value))
    if isinstance(value, (int, float)):
        return short(str(value))
    if isinstance(value, (datetime.date, datetime.datetime)):
        return f"{value} (a date; quote it to make it a string)"
    return describe(value)


def node_kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return "a scalar"

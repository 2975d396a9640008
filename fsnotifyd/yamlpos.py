"""Positioned YAML: documents read as nodes that know their line and column. Pure, no I/O.

The one YAML reader of the config (:mod:`fsnotifyd.config`), the rules files
(:mod:`fsnotifyd.rules.nodes`) and the replay's VE map (:mod:`fsnotifyd.replay.vemap`). Each of
them turns these positions into its own errors (``FILE:LINE[:COLUMN]: message (field 'x')``);
what is shared is here:

* :func:`compose` composes (never constructs: no object is built from untrusted text, and every
  value keeps its mark) with the safe loader, and turns every way PyYAML fails — a syntax error,
  a character YAML forbids, a document nested too deeply, anything else — into one
  :class:`YamlSyntaxError` that says where;
* :func:`position` is a node's 1-based ``(line, column)``;
* :func:`scalar_value` is the Python value of a scalar node (the safe constructors only);
* :class:`Value` is a small positioned tree for callers that also accept JSON (whose values have
  no positions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import yaml

__all__ = ["Value", "YamlSyntaxError", "compose", "position", "scalar_value", "value_of", "value_of_json"]


class YamlSyntaxError(Exception):
    """Why a text is not YAML, and where (1-based; ``None`` when PyYAML does not say).

    ``why`` is ``syntax`` (scanner, parser and composer errors: ``problem`` and ``context`` as
    PyYAML words them), ``character`` (a character YAML forbids: ``character``), ``depth``
    (nested deeper than Python's recursion limit) or ``other``.
    """

    def __init__(self, why: str, text: str, *, problem: str | None = None, context: str | None = None,
                 character: str | None = None, line: int | None = None, column: int | None = None) -> None:
        self.why, self.text, self.problem, self.context = why, text, problem, context
        self.character, self.line, self.column = character, line, column
        super().__init__(text)


def _line_column(text: str, pos: int) -> tuple[int, int]:
    pos = max(0, min(pos, len(text)))
    return text.count("\n", 0, pos) + 1, pos - (text.rfind("\n", 0, pos) + 1) + 1


def compose(text: str) -> yaml.Node | None:
    """The root node of ``text`` (``None`` for an empty document); raises :class:`YamlSyntaxError`."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise YamlSyntaxError("syntax", str(e), problem=e.problem, context=e.context,
                              line=mark.line + 1 if mark else None,
                              column=mark.column + 1 if mark else None) from e
    except yaml.reader.ReaderError as e:
        line, column = _line_column(text, e.position)
        raise YamlSyntaxError("character", str(e), character=e.character, line=line, column=column) from e
    except RecursionError:
        raise YamlSyntaxError("depth", "nested too deeply") from None
    except (yaml.YAMLError, ValueError) as e:
        raise YamlSyntaxError("other", str(e)) from e


def position(node: yaml.Node) -> tuple[int, int]:
    """``(line, column)`` of where ``node`` starts, both 1-based."""
    return node.start_mark.line + 1, node.start_mark.column + 1


def scalar_value(node: yaml.Node) -> Any:
    """The value the safe loader makes of ``node``; raises what its constructor raises (a
    ``2020-13-45`` resolves as a date and fails, a ``!!int x`` is no integer)."""
    # A constructor remembers every node it built; a fresh one (3 µs) keeps nothing alive.
    return yaml.SafeLoader("").construct_object(node, deep=True)


@dataclass(frozen=True, slots=True)
class Value:
    """A parsed value with where it came from (``None`` for JSON, which says nothing).

    ``kind`` is ``map`` (``value``: a list of (key, value) pairs, duplicates kept), ``seq``
    (a list), ``str`` (every scalar, as written) or ``null``.
    """

    kind: str
    value: Any
    line: int | None = None
    column: int | None = None


def value_of(node: yaml.Node) -> Value:
    """The :class:`Value` tree of a composed node."""
    line, column = position(node)
    if isinstance(node, yaml.MappingNode):
        return Value("map", [(value_of(k), value_of(v)) for k, v in node.value], line, column)
    if isinstance(node, yaml.SequenceNode):
        return Value("seq", [value_of(v) for v in node.value], line, column)
    if node.tag.endswith(":null"):
        return Value("null", None, line, column)
    return Value("str", str(node.value), line, column)


class _Pairs(list[Any]):  # a JSON object, as json's object_pairs_hook hands it over
    pass


def value_of_json(text: str) -> Value:
    """The :class:`Value` tree of a JSON text (no positions); raises ``ValueError``."""
    try:
        return _from_json(json.loads(text, object_pairs_hook=_Pairs))
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _from_json(obj: Any) -> Value:
    if isinstance(obj, _Pairs):
        return Value("map", [(_from_json(k), _from_json(v)) for k, v in obj])
    if isinstance(obj, list):
        return Value("seq", [_from_json(v) for v in obj])
    if obj is None:
        return Value("null", None)
    if isinstance(obj, bool):
        return Value("str", "true" if obj else "false")
    return Value("str", str(obj))

"""Reading the positioned YAML nodes of a rules file, in the words rules errors use.

The generic half of :mod:`.loader`: every mistake is collected as a
:class:`~fsnotifyd.errors.RuleError` naming file, line, column and dotted field, and the value
read is :data:`BAD` (its error already recorded) so reading goes on and one pass reports every
mistake. The document comes from :func:`fsnotifyd.yamlpos.compose`; only plain YAML tags are
allowed (no ``!!python/...``), and no merge keys.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence
from typing import Any

import yaml

from ..errors import RuleError
from ..wording import describe as _describe
from ..wording import node_kind as _node_kind
from ..wording import short as _short
from ..yamlpos import YamlSyntaxError, compose, position, scalar_value
from .schema import Origin

__all__ = ["BAD", "NodeReader", "STRING_TAGS", "YAML_TAG", "did_you_mean", "is_scalar_value", "one_of"]

YAML_TAG = "tag:yaml.org,2002:"
# Tags a rules file may carry, explicitly or by YAML's implicit resolution. "value" and "merge"
# are what the YAML 1.1 resolver gives a plain "=" or "<<" scalar: read as strings (but a "<<"
# *key* is a merge key, which is refused).
_SAFE_TAGS = frozenset(YAML_TAG + t for t in ("str", "int", "float", "bool", "null", "map", "seq", "timestamp",
                                               "value", "merge"))
STRING_TAGS = frozenset({YAML_TAG + "value", YAML_TAG + "merge"})
_TAG_NODE = {YAML_TAG + "map": yaml.MappingNode, YAML_TAG + "seq": yaml.SequenceNode}  # every other tag: scalars

BAD: Any = object()  # a value that was wrong; its error is already recorded


def one_of(names: Iterable[str]) -> str:
    names = list(names)
    if not names:
        return "nothing (none are defined)"
    return "one of: " + ", ".join(names)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def is_scalar_value(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


# --------------------------------------------------------------------------------------------


class NodeReader:
    """One rules file's nodes: type checks, mappings with known keys, scalars, lists."""

    def __init__(self, file: str, text: str, errors: list[RuleError]) -> None:
        self.file, self.text, self.errors = file, text, errors
        self.bad: set[int] = set()  # ids of nodes already reported (forbidden tags)

    # -- error reporting -------------------------------------------------------------------

    def what(self, node: yaml.Node) -> str:
        """What a node is, for "got ..." in messages: a list, a mapping, or the scalar's value."""
        if isinstance(node, yaml.ScalarNode):
            if node.tag in STRING_TAGS:
                return _describe(node.value)
            try:
                return _describe(scalar_value(node))
            except Exception:  # noqa: BLE001
                return "a scalar"
        return _node_kind(node)

    def origin(self, node: yaml.Node) -> Origin:
        return Origin(self.file, *position(node))

    def error(self, node: yaml.Node | None, field: str | None, message: str, expected: str,
              column: int | None = None) -> Any:
        line = col = None
        if node is not None:
            line, col = position(node)
        self.errors.append(RuleError(message, file=self.file, line=line, column=column or col,
                                     field=field or None, expected=expected))
        return BAD

    # -- the document ------------------------------------------------------------------------

    def root(self) -> yaml.Node | None:
        """The document's root node, its tags checked; ``None`` (error recorded) when it is not
        YAML, and ``None`` for an empty document or one of only ``~``/``null``."""
        try:
            root = compose(self.text)
        except YamlSyntaxError as e:
            self.errors.append(self._not_yaml(e))
            return None
        if root is None:
            return None
        self.check_tags(root)
        if isinstance(root, yaml.ScalarNode) and root.tag == YAML_TAG + "null":
            return None  # a file of only "~" or "null": no rules
        return root

    def _not_yaml(self, e: YamlSyntaxError) -> RuleError:
        if e.why == "syntax":
            problem = e.problem or e.context or "syntax error"
            return RuleError(f"not valid YAML: {problem}" + (f" ({e.context})" if e.context and e.problem else ""),
                             file=self.file, line=e.line, column=e.column,
                             expected="valid YAML (check indentation, quotes, brackets and colons)")
        if e.why == "character":
            return RuleError(f"not valid YAML: character {e.character!r} is not allowed",
                             file=self.file, line=e.line, column=e.column,
                             expected="printable text (no control characters)")
        if e.why == "depth":
            return RuleError("not valid YAML: nested too deeply", file=self.file,
                             expected="a rules file nested at most a few hundred levels deep")
        return RuleError(f"not valid YAML: {_short(e.text, 200)}", file=self.file, expected="valid YAML")

    def check_tags(self, root: yaml.Node) -> None:
        """Refuse every tag but plain YAML ones (so no !!python/... ever) and merge keys."""
        seen: set[int] = set()
        stack: list[tuple[yaml.Node, str]] = [(root, "")]
        while stack:
            node, path = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.tag not in _SAFE_TAGS or _TAG_NODE.get(node.tag, yaml.ScalarNode) is not type(node):
                shown = node.tag.replace(YAML_TAG, "!!")
                where = f" on {_node_kind(node)}" if node.tag in _SAFE_TAGS else ""
                self.error(node, path, f"YAML tag {_short(shown, 60)!r} is not allowed{where}",
                           "plain YAML values without tags (no !!python/... or custom tags)")
                self.bad.add(id(node))
                continue
            if isinstance(node, yaml.SequenceNode):
                for i, item in reversed(list(enumerate(node.value))):
                    stack.append((item, f"{path}[{i}]"))
            elif isinstance(node, yaml.MappingNode):
                for k, v in reversed(node.value):
                    name = k.value if isinstance(k, yaml.ScalarNode) else "?"
                    sub = f"{path}.{name}" if path else str(name)
                    if isinstance(k, yaml.ScalarNode) and k.tag == YAML_TAG + "merge":
                        self.error(k, sub, "YAML merge keys (<<) are not supported",
                                   "each key written out, or shared conditions in 'fragments' and 'lists'")
                        self.bad.add(id(k))
                        continue
                    stack.append((v, sub))
                    stack.append((k, sub))

    # -- generic node readers -----------------------------------------------------------------

    def mapping(self, node: yaml.Node, path: str, allowed: Sequence[str] | None,
                required: Sequence[str] = (), what: str = "a mapping", allow_null: bool = False) -> Any:
        """key -> (key node, value node); unknown and duplicate keys are errors (first one kept)."""
        if id(node) in self.bad:
            return BAD
        if allow_null and isinstance(node, yaml.ScalarNode) and node.tag == YAML_TAG + "null":
            return {}  # "key:" with nothing under it
        if not isinstance(node, yaml.MappingNode):
            exp = what if allowed is None else f"{what} with keys: {', '.join(allowed)}"
            return self.error(node, path, f"wrong type: got {self.what(node)}", exp)
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for knode, vnode in node.value:
            if id(knode) in self.bad:
                continue
            if not isinstance(knode, yaml.ScalarNode):
                self.error(knode, path, f"a key must be a plain name, got {_node_kind(knode)}", "a string key")
                continue
            key = knode.value
            sub = f"{path}.{key}" if path else key
            if allowed is not None and key not in allowed:
                self.error(knode, sub, f"unknown key {_short(key)!r}{did_you_mean(key, allowed)}",
                           one_of(allowed))
                continue
            if key in out:
                first = out[key][0].start_mark
                self.error(knode, sub, f"duplicate key {_short(key)!r} (first at line {first.line + 1}, "
                                       f"column {first.column + 1})", "each key once")
                continue
            out[key] = (knode, vnode)
        for key in required:
            if key not in out:
                self.error(node, f"{path}.{key}" if path else key, f"missing required key {key!r}",
                           f"a {key!r} key in this mapping")
        return out

    def scalar(self, node: yaml.Node, path: str, expected: str = "a scalar value") -> Any:
        """The Python value of a scalar node (safe constructors only)."""
        if id(node) in self.bad:
            return BAD
        if not isinstance(node, yaml.ScalarNode):
            return self.error(node, path, f"wrong type: got {self.what(node)}", expected)
        if node.tag in STRING_TAGS:
            return node.value
        try:
            return scalar_value(node)
        except Exception as e:  # noqa: BLE001 - e.g. "2020-13-45" resolves as a date and fails
            return self.error(node, path, f"cannot read value {_short(node.value)!r}: "
                                          f"{_short(str(e).splitlines()[0] if str(e) else type(e).__name__, 80)}",
                              expected)

    def typed(self, node: yaml.Node, path: str, kinds: tuple[type, ...], expected: str) -> Any:
        v = self.scalar(node, path, expected)
        if v is BAD:
            return v
        if isinstance(v, bool) and bool not in kinds:
            return self.error(node, path, f"wrong type: got {_describe(v)}", expected)
        if not isinstance(v, kinds):
            return self.error(node, path, f"wrong type: got {_describe(v)}", expected)
        return v

    def string(self, node: yaml.Node, path: str, expected: str = "a string") -> Any:
        return self.typed(node, path, (str,), expected)

    def boolean(self, node: yaml.Node, path: str) -> Any:
        return self.typed(node, path, (bool,), "a boolean (true or false)")

    def plain(self, node: yaml.Node, path: str) -> Any:
        """A JSON scalar: string, number, boolean or null (not a date)."""
        expected = "a string, number, boolean or null"
        v = self.scalar(node, path, expected)
        if v is BAD:
            return v
        if not is_scalar_value(v):
            return self.error(node, path, f"wrong type: got {_describe(v)}", expected)
        if isinstance(v, float) and math.isnan(v):
            return self.error(node, path, "NaN never equals anything", expected)
        return v

    def items(self, node: yaml.Node, path: str, expected: str, allow_scalar: bool = True) -> Any:
        """[(node, path)] of a list, or of a lone scalar when allowed."""
        if id(node) in self.bad:
            return BAD
        if isinstance(node, yaml.SequenceNode):
            return [(n, f"{path}[{i}]") for i, n in enumerate(node.value)]
        if allow_scalar and isinstance(node, yaml.ScalarNode):
            return [(node, path)]
        return self.error(node, path, f"wrong type: got {self.what(node)}", expected)

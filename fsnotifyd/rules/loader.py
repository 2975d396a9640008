"""Loading rules files: YAML in, a checked :class:`~fsnotifyd.rules.schema.RuleSet` out.

The YAML is composed to nodes (never constructed as a whole, and only with the safe loader)
so every mistake can name its file, line, column and dotted field, and say what was expected.
Loading does not stop at the first mistake: every error in every file is collected and raised
together as one :class:`~fsnotifyd.errors.RuleErrors`, so an operator fixes a file in one pass.

File format (version 1), documented in ``docs/rules.md`` and described for editors by
``rules/schema.json``::

    version: 1                  # optional; must be 1
    lists: {name: [scalars]}    # merged across files
    fragments: {name: {kind: ..., where: {...}}}  # merged across files
    rules: [ {name, description, enabled, match, sustained, window, threshold, cooldown,
              actions, dry_run, continue, reset_on}, ... ]

Loading happens in three passes over all files (lists, then fragments, then rules) so a rule
may use a list or fragment defined in another file.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from ..config import parse_window
from ..errors import ConfigError, RuleError, RuleErrors
from ..events import KINDS
from ..inventory import validate_ve_id
from ..wording import describe as _describe
from ..wording import short as _short
from ..wording import type_phrase
from .nodes import BAD, YAML_TAG, NodeReader, did_you_mean, one_of
from .schema import (
    ACTIONS,
    OPERATORS,
    Action,
    Condition,
    Match,
    Origin,
    Rule,
    RuleSet,
    Sustained,
    Threshold,
    VeSelector,
)

__all__ = ["load_rules", "parse_rules", "check_paths", "check_text", "parse_duration", "EVENT_FIELDS", "RULE_KINDS"]

VERSION = 1

# Every kind a rule may name (events.KINDS holds the engine's own "rule.matched" too).
RULE_KINDS = KINDS

# The dotted fields of the event JSON form (Event.to_dict()); "details.<anything>" is also valid.
EVENT_FIELDS = (
    "schema", "id", "time", "host", "kind", "severity",
    "device", "device.major", "device.minor", "device.name",
    "fs", "mount", "ve",
    "kernel.errno", "kernel.errno.name", "kernel.errno.number", "kernel.function", "kernel.line",
    "kernel.inode", "kernel.block", "kernel.comm", "kernel.pid", "kernel.message",
    "kernel.structure", "kernel.daddr", "kernel.mirror", "kernel.counter",  # XFS and btrfs
    "sources", "count", "first_time", "last_time",
)
# Fields whose value is an object (or null): only "exists" makes sense on them.
_OBJECT_FIELDS = frozenset({"device", "kernel.errno"})

TOP_KEYS = ("version", "lists", "fragments", "rules")
RULE_KEYS = ("name", "description", "enabled", "match", "threshold", "cooldown", "actions", "dry_run",
             "continue", "reset_on", "sustained", "window")
MATCH_KEYS = ("kind", "use", "where", "ve")
FRAGMENT_KEYS = ("description", "kind", "where")
THRESHOLD_KEYS = ("count", "within", "per")
SUSTAINED_KEYS = ("where", "for", "max_gap")
VE_KEYS = ("ids", "labels")
PER_VALUES = ("ve", "device")

MAX_COUNT = 1_000_000
MAX_WITHIN = 30 * 86400.0

RULE_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
REF_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_KIND_PATTERN = re.compile(r"[a-z_]+(?:\.[a-z_]+)*\.\*")
_DURATION = re.compile(
    r"(?:(?P<d>\d+(?:\.\d+)?)d)?(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m(?!s))?"
    r"(?:(?P<s>\d+(?:\.\d+)?)s)?(?:(?P<ms>\d+(?:\.\d+)?)ms)?"
)
_UNIT_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
DURATION_HELP = 'seconds as a number, or a string like "30s", "10m", "1h30m", "2d", "500ms"'
WINDOW_HELP = 'a time window "HH:MM-HH:MM" in local time (may wrap past midnight), like "01:00-05:00"'



# --------------------------------------------------------------------------------------------
# public API


def load_rules(paths: Sequence[str]) -> RuleSet:
    """Load and check rules files; raise :class:`RuleErrors` with every mistake in all of them."""
    ruleset, errors = _load(_read_all(paths))
    if errors:
        raise RuleErrors(errors)
    assert ruleset is not None
    return ruleset


def check_paths(paths: Sequence[str]) -> list[RuleError]:
    """Every mistake in these rules files (empty when they load)."""
    return _load(_read_all(paths))[1]


def parse_rules(text: str, file: str = "<string>") -> RuleSet:
    """Check one rules file given as text (tests, ``rules check -``); raise :class:`RuleErrors`."""
    ruleset, errors = _load([(file, text, None)])
    if errors:
        raise RuleErrors(errors)
    assert ruleset is not None
    return ruleset


def check_text(text: str, file: str = "<string>") -> list[RuleError]:
    """Every mistake in one rules file given as text."""
    return _load([(file, text, None)])[1]


def parse_duration(value: Any) -> float | None:
    """Seconds from a number or a duration string; ``None`` when it is not a duration."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return float(value) if abs(value) <= 10**15 else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if not isinstance(value, str) or not value:
        return None
    m = _DURATION.fullmatch(value)
    if m is None or not any(m.groupdict().values()):
        return None
    total = sum(float(v) * _UNIT_SECONDS[u] for u, v in m.groupdict().items() if v is not None)
    return total if math.isfinite(total) else None


# --------------------------------------------------------------------------------------------
# reading files


def _read_all(paths: Sequence[str]) -> list[tuple[str, str | None, RuleError | None]]:
    if isinstance(paths, str):  # a lone path is a Sequence[str] too
        paths = [paths]
    out: list[tuple[str, str | None, RuleError | None]] = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            out.append((path, None, RuleError(f"cannot read rules file: {e.strerror or e}", file=path,
                                              expected="a readable YAML rules file")))
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
            out.append((path, None, RuleError(f"not UTF-8 text (byte 0x{data[e.start]:02x})", file=path,
                                              line=line, column=column, expected="a UTF-8 text file")))
            continue
        out.append((path, text, None))
    return out


# --------------------------------------------------------------------------------------------
# the model being built, before it is frozen


@dataclass
class _List:
    values: tuple[Any, ...]
    origin: Origin
    ok: bool


@dataclass
class _Fragment:
    kinds: tuple[str, ...]
    conditions: tuple[Condition, ...]
    origin: Origin
    ok: bool


class _Registry:
    def __init__(self) -> None:
        self.lists: dict[str, _List] = {}
        self.fragments: dict[str, _Fragment] = {}
        self.rules: list[Rule] = []
        self.rule_names: dict[str, Origin] = {}


def _load(sources: Sequence[tuple[str, str | None, RuleError | None]]) -> tuple[RuleSet | None, list[RuleError]]:
    errors: list[RuleError] = []
    docs: list[tuple[_Reader, dict[str, tuple[yaml.Node, yaml.Node]]]] = []
    for file, text, err in sources:
        if err is not None:
            errors.append(err)
            continue
        r = _Reader(file, text or "", errors)
        top = r.document()
        if top:
            docs.append((r, top))
    reg = _Registry()
    for r, top in docs:
        if "lists" in top:
            r.lists(top["lists"][1], reg)
    for r, top in docs:
        if "fragments" in top:
            r.fragments(top["fragments"][1], reg)
    for r, top in docs:
        if "rules" in top:
            r.rules(top["rules"][1], reg)
    errors = _sorted_unique(errors, [f for f, _, _ in sources])
    if errors:
        return None, errors
    return RuleSet(rules=tuple(reg.rules), lists={k: v.values for k, v in reg.lists.items()},
                   files=tuple(f for f, _, _ in sources)), []


def _sorted_unique(errors: list[RuleError], files: list[str]) -> list[RuleError]:
    order = {f: i for i, f in reversed(list(enumerate(files)))}
    seen: set[str] = set()
    out = []
    for e in sorted(errors, key=lambda e: (order.get(e.file, len(order)), e.line or 0, e.column or 0)):
        if str(e) not in seen:
            seen.add(str(e))
            out.append(e)
    return out


# --------------------------------------------------------------------------------------------
# helpers


def _kind_matches(pattern: str, kind: str) -> bool:
    return kind.startswith(pattern[:-1]) if pattern.endswith("*") else kind == pattern


def _meet(x: str, y: str) -> str | None:
    """The narrower of two kinds/patterns when they overlap, else None."""
    if x == y:
        return x
    xp, yp = x.endswith("*"), y.endswith("*")
    if xp and yp:
        if x[:-1].startswith(y[:-1]):
            return x
        if y[:-1].startswith(x[:-1]):
            return y
        return None
    if xp:
        return y if y.startswith(x[:-1]) else None
    if yp:
        return x if x.startswith(y[:-1]) else None
    return None


def _intersect(a: Sequence[str], b: Sequence[str]) -> tuple[str, ...]:
    out: list[str] = []
    for x in a:
        for y in b:
            z = _meet(x, y)
            if z is not None and z not in out:
                out.append(z)
    return tuple(out)


def _valid_field(path: str) -> bool:
    if path in EVENT_FIELDS:
        return True
    if path.startswith("details."):
        return all(part for part in path[len("details."):].split("."))
    return False


_FIELDS_HELP = ", ".join(EVENT_FIELDS) + ", details.<name>"


# --------------------------------------------------------------------------------------------
# one file


class _Reader(NodeReader):
    """The rules grammar, over the positioned-node reader of :mod:`.nodes`."""

    # -- the document ------------------------------------------------------------------------

    def document(self) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
        root = self.root()
        if root is None:
            return None
        top = self.mapping(root, "", TOP_KEYS)
        if top is BAD:
            return None
        if "version" in top:
            node = top["version"][1]
            v = self.scalar(node, "version")
            if v is not BAD and (type(v) is not int or v != VERSION):
                self.error(node, "version", f"unsupported version: got {_describe(v)}", f"{VERSION}")
        return top

    def duration(self, node: yaml.Node, path: str, *, minimum: float = 0.0, exclusive: bool = False,
                 maximum: float | None = None) -> Any:
        bounds = (f"more than {_num(minimum)}" if exclusive else f"at least {_num(minimum)}") + " seconds"
        if maximum is not None:
            bounds += f" and at most {_num(maximum)} seconds ({_human(maximum)})"
        expected = f"a duration ({DURATION_HELP}), {bounds}"
        v = self.scalar(node, path, expected)
        if v is BAD:
            return v
        if isinstance(v, str) and v.startswith("-") and parse_duration(v[1:]) is not None:
            return self.error(node, path, f"negative duration {_short(v)!r}", expected)
        seconds = parse_duration(v)
        if seconds is None:
            what = f"not a duration: {_describe(v)}"
            return self.error(node, path, what, expected)
        if seconds < 0:
            return self.error(node, path, f"negative duration: {_num(seconds)} seconds", expected)
        if seconds < minimum or (exclusive and seconds <= minimum):
            return self.error(node, path, f"duration out of range: {_num(seconds)} seconds", expected)
        if maximum is not None and seconds > maximum:
            return self.error(node, path, f"duration out of range: {_num(seconds)} seconds", expected)
        return seconds

    def name(self, node: yaml.Node, path: str, pattern: re.Pattern[str], expected: str) -> Any:
        v = self.string(node, path, expected)
        if v is BAD:
            return v
        if not pattern.fullmatch(v):
            return self.error(node, path, f"invalid name {_short(v)!r}", expected)
        return v

    # -- kinds, conditions, VE selectors ----------------------------------------------------

    def kinds(self, node: yaml.Node, path: str, *, patterns: bool = True) -> Any:
        expected = "an event kind or a list of them" + (' (or prefix patterns like "fs.*")' if patterns else "")
        items = self.items(node, path, expected)
        if items is BAD:
            return BAD
        if not items:
            return self.error(node, path, "empty list of kinds",
                              "at least one kind (omit 'kind' to match every kind)" if patterns else expected)
        out: list[str] = []
        ok = True
        for n, p in items:
            k = self.kind(n, p, patterns=patterns)
            if k is BAD:
                ok = False
            elif k not in out:
                out.append(k)
        return tuple(out) if ok else BAD

    def kind(self, node: yaml.Node, path: str, *, patterns: bool) -> Any:
        known = sorted(RULE_KINDS)
        expected = one_of(known) + (', or a prefix pattern like "fs.*"' if patterns else "")
        v = self.string(node, path, "an event kind: " + expected)
        if v is BAD:
            return v
        if v in RULE_KINDS:
            return v
        if "*" in v:
            if not patterns:
                return self.error(node, path, f"a pattern is not allowed here: {_short(v)!r}",
                                  "an exact event kind: " + one_of(known))
            if not _KIND_PATTERN.fullmatch(v):
                return self.error(node, path, f"invalid kind pattern {_short(v)!r}",
                                  'a prefix pattern ending in ".*", like "fs.*"')
            if not any(_kind_matches(v, k) for k in known):
                return self.error(node, path, f"kind pattern {_short(v)!r} matches no known kind",
                                  'a pattern matching at least one kind, like "fs.*" or "dev.*"')
            return v
        return self.error(node, path, f"unknown event kind {_short(v)!r}{did_you_mean(v, known)}", expected)

    def where(self, node: yaml.Node, path: str, reg: _Registry) -> Any:
        fields = self.mapping(node, path, None, what="a mapping of event field -> condition")
        if fields is BAD:
            return BAD
        out: list[Condition] = []
        ok = True
        for fname, (knode, vnode) in fields.items():
            conds = self.conditions(fname, knode, vnode, f"{path}.{fname}", reg)
            if conds is BAD:
                ok = False
            else:
                out.extend(conds)
        return tuple(out) if ok else BAD

    def conditions(self, fname: str, knode: yaml.Node, vnode: yaml.Node, path: str, reg: _Registry) -> Any:
        if not _valid_field(fname):
            return self.error(knode, path, f"unknown event field {_short(fname)!r}"
                                           f"{did_you_mean(fname, EVENT_FIELDS)}", one_of([_FIELDS_HELP]))
        if id(vnode) in self.bad:
            return BAD
        if isinstance(vnode, yaml.ScalarNode):  # a bare scalar: equals
            if fname in _OBJECT_FIELDS:
                return self.error(vnode, path, f"{fname!r} is an object; only 'exists' applies to it",
                                  "{exists: true} or {exists: false}")
            v = self.plain(vnode, path)
            return BAD if v is BAD else [Condition(fname, "equals", v, self.origin(knode))]
        if isinstance(vnode, yaml.SequenceNode):
            return self.error(vnode, path, "a list is not a condition",
                              "a scalar (equals) or a mapping of operators, e.g. {in: [a, b]}")
        ops = self.mapping(vnode, path, sorted(OPERATORS), what="a mapping of operators")
        if ops is BAD:
            return BAD
        if not vnode.value:
            return self.error(vnode, path, "empty condition", "at least one operator: " + ", ".join(sorted(OPERATORS)))
        out: list[Condition] = []
        ok = True
        for op, (onode, xnode) in ops.items():
            c = self.condition(fname, op, onode, xnode, f"{path}.{op}", reg)
            if c is BAD:
                ok = False
            else:
                out.append(c)
        return out if ok else BAD

    def condition(self, fname: str, op: str, onode: yaml.Node, xnode: yaml.Node, path: str, reg: _Registry) -> Any:
        origin = self.origin(onode)
        if fname in _OBJECT_FIELDS and op != "exists":
            return self.error(onode, path, f"{fname!r} is an object; only 'exists' applies to it",
                              "{exists: true} or {exists: false}")
        if op in ("equals", "ne"):
            v = self.plain(xnode, path)
        elif op in ("in", "not_in"):
            expected = "a non-empty list of strings, numbers, booleans or nulls"
            items = self.items(xnode, path, expected, allow_scalar=False)
            if items is BAD:
                return BAD
            if not items:
                return self.error(xnode, path, "empty list", expected)
            vals = [self.plain(n, p) for n, p in items]
            if any(x is BAD for x in vals):
                return BAD
            v = tuple(vals)
        elif op == "in_list":
            ref = self.string(xnode, path, "the name of a list defined under 'lists'")
            if ref is BAD:
                return BAD
            lst = reg.lists.get(ref)
            if lst is None:
                return self.error(xnode, path, f"unknown list {_short(ref)!r}{did_you_mean(ref, reg.lists)}",
                                  "a list defined under 'lists': " + one_of(sorted(reg.lists)))
            return Condition(fname, "in", lst.values, origin)
        elif op == "regex":
            v = self.string(xnode, path, "a regular expression (Python re syntax) as a string")
            if v is BAD:
                return BAD
            try:
                re.compile(v)
            except re.error as e:
                return self.error(xnode, path, f"invalid regular expression: {e.msg} at position {e.pos}",
                                  "a regular expression in Python re syntax",
                                  column=self._column_in(xnode, v, e.pos))
            except (RecursionError, OverflowError, ValueError) as e:
                return self.error(xnode, path, f"invalid regular expression: {_short(str(e), 80)}",
                                  "a regular expression in Python re syntax")
        elif op in ("gt", "ge", "lt", "le"):
            v = self.typed(xnode, path, (int, float), "a number")
            if v is not BAD and isinstance(v, float) and math.isnan(v):
                return self.error(xnode, path, "NaN compares false with everything", "a number")
        elif op == "exists":
            v = self.boolean(xnode, path)
        elif op in ("prefix", "suffix", "contains"):
            v = self.string(xnode, path)
        else:  # pragma: no cover - mapping() only lets OPERATORS through
            return self.error(onode, path, f"unknown operator {op!r}", one_of(sorted(OPERATORS)))
        return BAD if v is BAD else Condition(fname, op, v, origin)

    def _column_in(self, node: yaml.Node, value: str, pos: int | None) -> int | None:
        """The column of character ``pos`` of a one-line scalar, when the source shows it verbatim."""
        if pos is None or node.start_mark.line != node.end_mark.line:
            return None
        width = node.end_mark.column - node.start_mark.column
        style = getattr(node, "style", None)
        if style is None and width == len(value):
            return node.start_mark.column + 1 + pos
        if style in ("'", '"') and width == len(value) + 2:
            return node.start_mark.column + 2 + pos
        return None

    def ve(self, node: yaml.Node, path: str) -> Any:
        expected = 'a VE id, a list of VE ids, or a mapping {ids: [...], labels: {key: value}}'
        if id(node) in self.bad:
            return BAD
        if isinstance(node, yaml.MappingNode):
            m = self.mapping(node, path, VE_KEYS)
            if m is BAD:
                return BAD
            if not node.value:
                return self.error(node, path, "empty VE selector", "'ids', 'labels' or both")
            ids: Any = ()
            labels: Any = ()
            if "ids" in m:
                ids = self.ve_ids(m["ids"][1], f"{path}.ids")
            if "labels" in m:
                labels = self.labels(m["labels"][1], f"{path}.labels")
            if ids is BAD or labels is BAD:
                return BAD
            return VeSelector(ids=ids, labels=labels)
        ids = self.ve_ids(node, path, expected)
        return BAD if ids is BAD else VeSelector(ids=ids)

    def ve_ids(self, node: yaml.Node, path: str, expected: str = "a VE id or a list of VE ids") -> Any:
        items = self.items(node, path, expected)
        if items is BAD:
            return BAD
        if not items:
            return self.error(node, path, "empty list of VE ids", "at least one VE id")
        out: list[str] = []
        for n, p in items:
            v = self.typed(n, p, (str, int), "a VE id (string)")
            if v is BAD:
                return BAD
            try:
                ve_id = validate_ve_id(str(v))
            except ConfigError:
                return self.error(n, p, f"invalid VE id {_short(str(v))!r}",
                                  "1-64 characters from A-Z a-z 0-9 _ . : -, starting with a letter or digit, "
                                  "without '..'")
            if ve_id not in out:
                out.append(ve_id)
        return tuple(out)

    def labels(self, node: yaml.Node, path: str) -> Any:
        m = self.mapping(node, path, None, what="a mapping of label -> value")
        if m is BAD:
            return BAD
        out: list[tuple[str, str]] = []
        for key, (_, vnode) in m.items():
            v = self.typed(vnode, f"{path}.{key}", (str, int, float), "a label value (string or number)")
            if v is BAD:
                return BAD
            out.append((key, str(v)))
        return tuple(out)

    # -- lists and fragments ----------------------------------------------------------------

    def lists(self, node: yaml.Node, reg: _Registry) -> None:
        m = self.mapping(node, "lists", None, what="a mapping of list name -> list of values",
                         allow_null=True)
        if m is BAD:
            return
        for key, (knode, vnode) in m.items():
            path = f"lists.{key}"
            before = len(self.errors)
            self.name(knode, path, REF_NAME, "a list name of 1-64 characters from A-Z a-z 0-9 _ . -")
            expected = "a non-empty list of strings, numbers, booleans or nulls"
            values: list[Any] = []
            items = self.items(vnode, path, expected, allow_scalar=False)
            if items is not BAD:
                if not items:
                    self.error(vnode, path, "empty list", expected)
                for n, p in items:
                    v = self.plain(n, p)
                    if v is not BAD:
                        values.append(v)
            if key in reg.lists:
                first = reg.lists[key].origin
                self.error(knode, path, f"duplicate list name {_short(key)!r} (first defined at {first})",
                           "list names unique across all rules files")
                continue
            reg.lists[key] = _List(tuple(values), self.origin(knode), len(self.errors) == before)

    def fragments(self, node: yaml.Node, reg: _Registry) -> None:
        m = self.mapping(node, "fragments", None, what="a mapping of fragment name -> match fragment",
                         allow_null=True)
        if m is BAD:
            return
        for key, (knode, vnode) in m.items():
            path = f"fragments.{key}"
            before = len(self.errors)
            self.name(knode, path, REF_NAME, "a fragment name of 1-64 characters from A-Z a-z 0-9 _ . -")
            kinds: Any = ()
            conds: Any = ()
            f = self.mapping(vnode, path, FRAGMENT_KEYS, what="a match fragment")
            if f is not BAD:
                if not vnode.value:
                    self.error(vnode, path, "empty fragment", "'kind', 'where' or both")
                if "description" in f:
                    self.string(f["description"][1], f"{path}.description")
                if "kind" in f:
                    kinds = self.kinds(f["kind"][1], f"{path}.kind")
                if "where" in f:
                    conds = self.where(f["where"][1], f"{path}.where", reg)
            if key in reg.fragments:
                first = reg.fragments[key].origin
                self.error(knode, path, f"duplicate fragment name {_short(key)!r} (first defined at {first})",
                           "fragment names unique across all rules files")
                continue
            reg.fragments[key] = _Fragment(() if kinds is BAD else kinds, () if conds is BAD else conds,
                                           self.origin(knode), len(self.errors) == before)

    # -- rules ------------------------------------------------------------------------------

    def rules(self, node: yaml.Node, reg: _Registry) -> None:
        if isinstance(node, yaml.ScalarNode) and node.tag == YAML_TAG + "null" and id(node) not in self.bad:
            return  # "rules:" with nothing under it
        items = self.items(node, "rules", "a list of rules", allow_scalar=False)
        if items is BAD:
            return
        for rnode, path in items:
            before = len(self.errors)
            rule = self.rule(rnode, path, reg)
            if rule is not BAD and len(self.errors) == before:
                reg.rules.append(rule)

    def rule(self, node: yaml.Node, path: str, reg: _Registry) -> Any:
        m = self.mapping(node, path, RULE_KEYS, required=("name", "match", "actions"), what="a rule mapping")
        if m is BAD:
            return BAD
        kw: dict[str, Any] = {"origin": self.origin(node)}
        ok = True

        def put(key: str, value: Any) -> None:
            nonlocal ok
            if value is BAD:
                ok = False
            else:
                kw[key] = value

        if "name" in m:
            nnode = m["name"][1]
            name = self.name(nnode, f"{path}.name", RULE_NAME,
                             "a rule name of 1-64 characters from a-z 0-9 _ . -, starting with a letter or digit")
            if name is not BAD:
                if name in reg.rule_names:
                    name = self.error(nnode, f"{path}.name", f"duplicate rule name {name!r} "
                                                             f"(first defined at {reg.rule_names[name]})",
                                      "rule names unique across all rules files")
                else:
                    reg.rule_names[name] = self.origin(nnode)
            put("name", name)
        if "description" in m:
            put("description", self.string(m["description"][1], f"{path}.description"))
        for key, attr in (("enabled", "enabled"), ("dry_run", "dry_run"), ("continue", "continue_")):
            if key in m:
                put(attr, self.boolean(m[key][1], f"{path}.{key}"))
        if "match" in m:
            put("match", self.match(m["match"][1], f"{path}.match", reg))
        if "threshold" in m:
            put("threshold", self.threshold(m["threshold"][1], f"{path}.threshold"))
        if "cooldown" in m:
            put("cooldown", self.duration(m["cooldown"][1], f"{path}.cooldown", minimum=0.0))
        if "sustained" in m:
            put("sustained", self.sustained(m["sustained"][1], f"{path}.sustained", reg))
        if "window" in m:
            wnode = m["window"][1]
            text = self.string(wnode, f"{path}.window", WINDOW_HELP)
            if text is not BAD:
                try:
                    put("window", parse_window(text))
                    put("window_text", text)
                except ValueError:
                    put("window", self.error(wnode, f"{path}.window", f"not a window: {_short(text)!r}",
                                             WINDOW_HELP))
            else:
                put("window", BAD)
        if "actions" in m:
            put("actions", self.actions(m["actions"][1], f"{path}.actions"))
        if "reset_on" in m:
            put("reset_on", self.kinds(m["reset_on"][1], f"{path}.reset_on", patterns=False))
        if not ok or not all(k in kw for k in ("name", "match", "actions")):
            return BAD
        return Rule(**kw)

    def match(self, node: yaml.Node, path: str, reg: _Registry) -> Any:
        m = self.mapping(node, path, MATCH_KEYS, what="a match mapping")
        if m is BAD:
            return BAD
        ok = True
        kinds: Any = ()
        if "kind" in m:
            kinds = self.kinds(m["kind"][1], f"{path}.kind")
            if kinds is BAD:
                ok, kinds = False, ()
        conditions: list[Condition] = []
        if "use" in m:
            items = self.items(m["use"][1], f"{path}.use", "a fragment name or a list of fragment names")
            if items is BAD:
                ok = False
                items = []
            for n, p in items:
                ref = self.string(n, p, "the name of a fragment defined under 'fragments'")
                if ref is BAD:
                    ok = False
                    continue
                frag = reg.fragments.get(ref)
                if frag is None:
                    ok = self.error(n, p, f"unknown fragment {_short(ref)!r}{did_you_mean(ref, reg.fragments)}",
                                    "a fragment defined under 'fragments': " + one_of(sorted(reg.fragments)))
                    continue
                conditions.extend(frag.conditions)
                if not frag.ok:
                    ok = False  # its own errors are reported where it is defined
                    continue
                if frag.kinds:
                    if not kinds:
                        kinds = frag.kinds
                    else:
                        both = _intersect(kinds, frag.kinds)
                        if not both:
                            ok = self.error(n, p, f"impossible match: fragment {ref!r} kinds "
                                                  f"[{', '.join(frag.kinds)}] share no kind with "
                                                  f"[{', '.join(kinds)}]",
                                            "kinds that overlap (or no 'kind' on one of them)")
                            continue
                        kinds = both
        if "where" in m:
            conds = self.where(m["where"][1], f"{path}.where", reg)
            if conds is BAD:
                ok = False
            else:
                conditions.extend(conds)
        ve = None
        if "ve" in m:
            ve = self.ve(m["ve"][1], f"{path}.ve")
            if ve is BAD:
                ok = False
        if ok is not True:
            return BAD
        return Match(kinds=tuple(kinds), conditions=tuple(conditions), ve=ve)

    def threshold(self, node: yaml.Node, path: str) -> Any:
        m = self.mapping(node, path, THRESHOLD_KEYS, required=("count", "within"), what="a threshold mapping")
        if m is BAD:
            return BAD
        count = within = BAD
        per: Any = "ve"
        if "count" in m:
            cnode = m["count"][1]
            expected = f"an integer from 1 to {MAX_COUNT}"
            count = self.typed(cnode, f"{path}.count", (int,), expected)
            if count is not BAD and not 1 <= count <= MAX_COUNT:
                count = self.error(cnode, f"{path}.count", f"impossible threshold count {_short(str(count))}",
                                   expected)
        if "within" in m:
            within = self.duration(m["within"][1], f"{path}.within", minimum=0.0, exclusive=True,
                                   maximum=MAX_WITHIN)
        if "per" in m:
            pnode = m["per"][1]
            per = self.string(pnode, f"{path}.per", one_of(PER_VALUES))
            if per is not BAD and per not in PER_VALUES:
                per = self.error(pnode, f"{path}.per", f"unknown value {_short(per)!r}", one_of(PER_VALUES))
        if BAD in (count, within, per):
            return BAD
        return Threshold(count=count, within=within, per=per)

    def sustained(self, node: yaml.Node, path: str, reg: _Registry) -> Any:
        m = self.mapping(node, path, SUSTAINED_KEYS, required=("where", "for"), what="a sustained mapping")
        if m is BAD:
            return BAD
        conds: Any = BAD
        hold: Any = BAD
        if "where" in m:
            conds = self.where(m["where"][1], f"{path}.where", reg)
            if conds is not BAD and not conds:
                conds = self.error(m["where"][1], f"{path}.where", "no condition to sustain",
                                   "at least one field condition, e.g. {details.figures.fragmentation: {gt: 1.2}}")
        if "for" in m:
            hold = self.duration(m["for"][1], f"{path}.for", minimum=0.0, exclusive=True, maximum=MAX_WITHIN)
        gap: Any = hold
        if "max_gap" in m:
            gap = self.duration(m["max_gap"][1], f"{path}.max_gap", minimum=0.0, exclusive=True,
                                maximum=MAX_WITHIN)
        if BAD in (conds, hold, gap):
            return BAD
        return Sustained(conditions=tuple(conds), hold=hold, max_gap=gap)

    # -- actions ----------------------------------------------------------------------------

    def actions(self, node: yaml.Node, path: str) -> Any:
        expected = "a non-empty list of actions (a name, or {name: {parameters}})"
        items = self.items(node, path, expected, allow_scalar=False)
        if items is BAD:
            return BAD
        if not items:
            return self.error(node, path, "no actions", expected)
        out = [self.action(n, p) for n, p in items]
        return BAD if any(a is BAD for a in out) else tuple(out)

    def action(self, node: yaml.Node, path: str) -> Any:
        names = sorted(ACTIONS)
        shape = "an action name or a one-key mapping {name: {parameters}}; actions: " + ", ".join(names)
        if id(node) in self.bad:
            return BAD
        if isinstance(node, yaml.ScalarNode):
            name_node, pnode = node, None
        elif isinstance(node, yaml.MappingNode):
            m = self.mapping(node, path, None)
            if m is BAD:
                return BAD
            if len(m) != 1:
                return self.error(node, path, f"an action mapping must have exactly one key, got {len(m)}", shape)
            ((name_node, pnode),) = m.values()
        else:
            return self.error(node, path, f"wrong type: got {self.what(node)}", shape)
        name = self.string(name_node, path, shape)
        if name is BAD:
            return BAD
        if name not in ACTIONS:
            return self.error(name_node, path, f"unknown action {_short(name)!r}{did_you_mean(name, names)}",
                              one_of(names))
        apath = f"{path}.{name}"
        spec = ACTIONS[name]
        params: Any = {}
        if pnode is not None:
            params = self.mapping(pnode, apath, sorted(spec), what=f"a mapping of {name} parameters",
                                  allow_null=True)
            if params is BAD:
                return BAD
        ok = True
        values: list[tuple[str, Any]] = []
        for pname, (_, vnode) in params.items():
            v = self.param(name, pname, vnode, f"{apath}.{pname}")
            if v is BAD:
                ok = False
            else:
                values.append((pname, v))
        for pname, (_, _, required) in spec.items():
            if required and pname not in params:
                ok = self.error(name_node, f"{apath}.{pname}", f"missing required parameter {pname!r} of {name!r}",
                                self._param_expected(name, pname))
        if ok is not True:
            return BAD
        return Action(name=name, params=tuple(values), origin=self.origin(name_node))

    def _param_expected(self, action: str, pname: str) -> str:
        types, allowed, _ = ACTIONS[action][pname]
        if allowed is not None:
            return one_of(str(a) for a in allowed)
        if list in types:
            return "a non-empty list of strings"
        if action == "exec" and pname == "timeout":
            return f"a duration ({DURATION_HELP}) more than 0"
        if action == "snapshot" and pname == "keep":
            return "an integer of at least 1"
        return type_phrase(types)

    def param(self, action: str, pname: str, node: yaml.Node, path: str) -> Any:
        types, allowed, _ = ACTIONS[action][pname]
        expected = self._param_expected(action, pname)
        if list in types:
            items = self.items(node, path, expected, allow_scalar=False)
            if items is BAD:
                return BAD
            if not items:
                return self.error(node, path, "empty list", expected)
            vals = [self.string(n, p, "a string") for n, p in items]
            if any(v is BAD for v in vals):
                return BAD
            if not vals[0]:
                return self.error(items[0][0], items[0][1], "empty program name", "a program to run")
            return tuple(vals)
        v = self.typed(node, path, types, expected)
        if v is BAD:
            return v
        if isinstance(v, float) and not math.isfinite(v):
            return self.error(node, path, f"not a finite number: {_describe(v)}", expected)
        if allowed is not None and v not in allowed:
            return self.error(node, path, f"value not allowed: {_describe(v)}", expected)
        if action == "exec" and pname == "timeout":
            seconds = parse_duration(v)
            if seconds is None or seconds <= 0:
                return self.error(node, path, f"not a positive duration: {_describe(v)}", expected)
        if action == "snapshot" and pname == "keep" and v < 1:
            return self.error(node, path, f"keep must be at least 1, got {v}", expected)
        return v


def _num(x: float) -> str:
    """A number as people write it: 2592000, 0.5 (not 2.592e+06)."""
    text = f"{x:.3f}".rstrip("0").rstrip(".")
    return text if len(text) <= 24 else f"{x:g}"


def _human(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"

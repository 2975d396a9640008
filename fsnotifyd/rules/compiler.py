"""Turning checked rules into fast matchers.

A rule's match becomes one predicate over the event's JSON form (a dict): each condition is a
closure over a precomputed field getter and operator, built once. Rules are indexed by event
kind, so an event is only tested against the rules that can match its kind.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from . import native
from .decide import OPS, CompiledRule
from .schema import Condition, Match, Rule, RuleSet, VeSelector

Event = Mapping[str, Any]
Predicate = Callable[[Event], bool]
LabelsOf = Callable[[str], Mapping[str, str]]

_MISSING = object()


def getter(path: str) -> Callable[[Event], Any]:
    """A function reading a dotted path from an event dict (None when any step is absent)."""
    parts = path.split(".")
    if len(parts) == 1:
        (a,) = parts
        return lambda e: e.get(a)
    if len(parts) == 2:
        a, b = parts

        def get2(e: Event) -> Any:
            v = e.get(a)
            return v.get(b) if isinstance(v, dict) else None

        return get2

    def get_n(e: Event) -> Any:
        v: Any = e
        for p in parts:
            if not isinstance(v, dict):
                return None
            v = v.get(p)
        return v

    return get_n


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def condition(c: Condition) -> Predicate:
    get, x = getter(c.field), c.value
    op = c.op
    if op == "equals":
        return lambda e: get(e) == x
    if op == "ne":
        return lambda e: get(e) != x
    if op in ("in", "in_list"):
        values = frozenset(x)
        return lambda e: _hashable_in(get(e), values)
    if op == "not_in":
        values = frozenset(x)
        return lambda e: not _hashable_in(get(e), values)
    if op == "regex":
        rx = re.compile(x)
        return lambda e: (v := get(e)) is not None and rx.fullmatch(v if isinstance(v, str) else str(v)) is not None
    if op == "prefix":
        return lambda e: isinstance(v := get(e), str) and v.startswith(x)
    if op == "suffix":
        return lambda e: isinstance(v := get(e), str) and v.endswith(x)
    if op == "contains":
        return lambda e: isinstance(v := get(e), str) and x in v
    if op == "gt":
        return lambda e: _number(v := get(e)) and v > x
    if op == "ge":
        return lambda e: _number(v := get(e)) and v >= x
    if op == "lt":
        return lambda e: _number(v := get(e)) and v < x
    if op == "le":
        return lambda e: _number(v := get(e)) and v <= x
    if op == "exists":
        return (lambda e: get(e) is not None) if x else (lambda e: get(e) is None)
    raise ValueError(f"unknown operator {op!r}")  # the loader rejects these before here


def _hashable_in(v: Any, values: frozenset) -> bool:
    try:
        return v in values
    except TypeError:  # a list or dict field compared with scalars
        return False


def ve_predicate(sel: VeSelector, labels_of: LabelsOf) -> Predicate:
    ids = frozenset(sel.ids)
    labels = dict(sel.labels)

    def match(e: Event) -> bool:
        ve = e.get("ve")
        if not isinstance(ve, str):  # null, or garbage in a hand-edited log
            return False
        if ids and ve not in ids:
            return False
        if labels:
            have = labels_of(ve)
            return all(have.get(k) == v for k, v in labels.items())
        return True

    return match


def _always(e: Event) -> bool:
    return True


def _residual(m: Match, skip: str | None) -> tuple[list[Condition], VeSelector | None]:
    """The conditions and VE selector left to test when an index guarantees field ``skip``."""
    conds = [c for c in m.conditions if not (skip is not None and c.field == skip and c.op in _INDEXABLE)]
    sel = m.ve
    if sel is not None and skip == "ve" and sel.ids and not any(
            c.field == "ve" and c.op in _INDEXABLE for c in m.conditions):
        sel = VeSelector((), sel.labels)
    if sel is not None and not (sel.ids or sel.labels):
        sel = None
    return conds, sel


def match_predicate(m: Match, labels_of: LabelsOf, skip: str | None = None) -> Predicate:
    """The match as one predicate; ``skip`` names a field an index already guarantees.

    Generated as the source of one flat function (field reads and operators inline), because
    in a replay predicates run several times per event and nested closure calls cost more
    than the tests themselves. :func:`closure_predicate` is the plain reference version; a
    property test holds the two to the same answers.
    """
    conds, sel = _residual(m, skip)
    if not conds and sel is None:
        return _always
    return _generate(conds, sel, labels_of)


def match_program(m: Match, skip: str | None = None) -> tuple | None:
    """The same test as :func:`match_predicate`, as data for the C core: a tuple of
    (path, opcode, constant). None when it needs Python (VE labels come from the inventory)."""
    conds, sel = _residual(m, skip)
    prog: list[tuple[tuple[str, ...], int, Any]] = []
    for c in conds:
        name, value = c.op, c.value
        if name in ("in", "in_list", "not_in"):
            name, value = ("not_in" if name == "not_in" else "in"), frozenset(value)
        elif name == "regex":
            value = re.compile(value)
        elif name == "exists":
            name, value = ("exists" if value else "missing"), None
        prog.append((tuple(c.field.split(".")), OPS.index(name), value))
    if sel is not None:
        if sel.labels:
            return None
        prog.append((("ve",), OPS.index("ve_in"), frozenset(sel.ids)))
    return tuple(prog)


_CODE = {
    "equals": "v == {c}",
    "ne": "v != {c}",
    "in": "(v.__class__ is not list and v.__class__ is not dict and v in {c})",
    "in_list": "(v.__class__ is not list and v.__class__ is not dict and v in {c})",
    "not_in": "not (v.__class__ is not list and v.__class__ is not dict and v in {c})",
    "regex": "(v is not None and {c}.fullmatch(v if v.__class__ is str else str(v)) is not None)",
    "prefix": "(v.__class__ is str and v.startswith({c}))",
    "suffix": "(v.__class__ is str and v.endswith({c}))",
    "contains": "(v.__class__ is str and {c} in v)",
    "gt": "((v.__class__ is int or v.__class__ is float) and v > {c})",
    "ge": "((v.__class__ is int or v.__class__ is float) and v >= {c})",
    "lt": "((v.__class__ is int or v.__class__ is float) and v < {c})",
    "le": "((v.__class__ is int or v.__class__ is float) and v <= {c})",
}


def _read_field(path: str) -> list[str]:
    parts = path.split(".")
    lines = [f"v = e.get({parts[0]!r})"]
    for p in parts[1:]:
        lines.append(f"v = v.get({p!r}) if v.__class__ is dict else None")
    return lines


def _generate(conds: list[Condition], sel: VeSelector | None, labels_of: LabelsOf) -> Predicate:
    ns: dict[str, Any] = {}
    body: list[str] = []
    for i, c in enumerate(conds):
        name = f"C{i}"
        if c.op in ("in", "in_list", "not_in"):
            ns[name] = frozenset(c.value)
        elif c.op == "regex":
            ns[name] = re.compile(c.value)
        else:
            ns[name] = c.value
        body += _read_field(c.field)
        if c.op == "exists":
            test = "v is not None" if c.value else "v is None"
        else:
            test = _CODE[c.op].format(c=name)
        body.append(f"if not ({test}): return False")
    if sel is not None:
        body.append("v = e.get('ve')")
        body.append("if v.__class__ is not str: return False")
        if sel.ids:
            ns["VE_IDS"] = frozenset(sel.ids)
            body.append("if v not in VE_IDS: return False")
        if sel.labels:
            ns["LABELS"] = tuple(sel.labels)
            ns["labels_of"] = labels_of
            body.append("have = labels_of(v)")
            body.append("for k, want in LABELS:")
            body.append("    if have.get(k) != want: return False")
    body.append("return True")
    src = "def predicate(e):\n" + "\n".join("    " + line for line in body) + "\n"
    exec(compile(src, "<fsnotifyd rule predicate>", "exec"), ns)  # noqa: S102 - built from checked rules
    fn = ns["predicate"]
    fn.source = src  # for debugging: print(rule predicate source)
    return fn


def closure_predicate(m: Match, labels_of: LabelsOf) -> Predicate:
    """The reference predicate, built from the per-operator closures."""
    preds = [condition(c) for c in m.conditions]
    if m.ve is not None:
        preds.append(ve_predicate(m.ve, labels_of))
    if not preds:
        return _always
    if len(preds) == 1:
        return preds[0]
    if len(preds) == 2:
        p, q = preds
        return lambda e: p(e) and q(e)
    return lambda e: all(p(e) for p in preds)


def compiled_rule(index: int, rule: Rule, labels_of: LabelsOf, skip: str | None = None,
                  impl: ModuleType = native.impl) -> CompiledRule:
    """The rule ready to run, as the chosen implementation's ``CompiledRule``."""
    return impl.CompiledRule(index, rule, match_predicate(rule.match, labels_of, skip), match_program(rule.match, skip))


_INDEXABLE = ("equals", "in", "in_list")


def _equality_fields(rule: Rule) -> dict[str, frozenset]:
    """Fields whose value the rule pins to a set (equals / in / VE ids): usable as an index."""
    out: dict[str, frozenset] = {}
    for c in rule.match.conditions:
        if c.op in _INDEXABLE and c.field not in out:
            try:
                out[c.field] = frozenset([c.value] if c.op == "equals" else c.value)
            except TypeError:
                continue
    if rule.match.ve is not None and rule.match.ve.ids and "ve" not in out:
        out["ve"] = frozenset(rule.match.ve.ids)
    return out


class _KindIndex:
    """The rules for one kind, indexed on the field most of them pin to values.

    An event is then tested only against the rules that pin that field to its value plus the
    rules that do not pin it, instead of every rule of its kind.
    """

    def __init__(self, rules: list[CompiledRule], labels_of: LabelsOf, impl: ModuleType) -> None:
        self.rules = rules
        self.get: Callable[[Event], Any] | None = None
        self.path: tuple[str, ...] | None = None  # the indexed field, for the C core
        self.cache: dict[Any, list[CompiledRule]] = {}
        pinned = {cr.index: _equality_fields(cr.rule) for cr in rules}
        counts: dict[str, int] = {}
        for fields in pinned.values():
            for f in fields:
                counts[f] = counts.get(f, 0) + 1
        if not counts or max(counts.values()) < 2:
            return
        field = max(counts, key=lambda f: (counts[f], f))
        self.get = getter(field)
        self.path = tuple(field.split("."))
        self.rest = [cr for cr in rules if field not in pinned[cr.index]]
        self.by_value: dict[Any, list[CompiledRule]] = {}
        for cr in rules:
            if field not in pinned[cr.index]:
                continue
            # Found through the index, the rule need not test the indexed field again.
            residual = compiled_rule(cr.index, cr.rule, labels_of, skip=field, impl=impl)
            for v in pinned[cr.index][field]:
                self.by_value.setdefault(v, []).append(residual)

    def candidates(self, event: Event) -> list[CompiledRule]:
        if self.get is None:
            return self.rules
        v = self.get(event)
        try:
            return self.cache[v]
        except KeyError:
            pass
        except TypeError:  # an unhashable value pins nothing
            return self.rest
        hit = self.by_value.get(v)
        merged = sorted(self.rest + hit, key=lambda cr: cr.index) if hit else self.rest
        if len(self.cache) < 65536:
            self.cache[v] = merged
        return merged


@dataclass
class Compiled:
    """Rules indexed by kind (and within a kind by a pinned field); in file order."""

    rules: list[CompiledRule]
    by_kind: dict[str, list[CompiledRule]]
    wildcard: list[tuple[tuple[str, ...], CompiledRule]]  # prefix patterns / any kind
    _cache: dict[str, _KindIndex]
    labels_of: LabelsOf = lambda ve: {}
    impl: ModuleType = native.impl
    # kind -> (indexed path or None, value cache, rules): the index as the C core reads it
    fast: dict[str, tuple] = field(default_factory=dict)

    def for_kind(self, kind: str) -> list[CompiledRule]:
        return self._index(kind).rules

    def candidates(self, kind: str, event: Event) -> list[CompiledRule]:
        """The rules that can match this event (a superset of those whose predicate holds)."""
        idx = self._cache.get(kind)
        if idx is None:
            idx = self._index(kind)
        return idx.candidates(event)

    def _index(self, kind: str) -> _KindIndex:
        hit = self._cache.get(kind)
        if hit is None:
            found = {cr.index: cr for cr in self.by_kind.get(kind, ())}
            for prefixes, cr in self.wildcard:
                if not prefixes or any(kind.startswith(p) for p in prefixes):
                    found[cr.index] = cr
            hit = _KindIndex([found[i] for i in sorted(found)], self.labels_of, self.impl)
            if len(self._cache) < 4096:
                self._cache[kind] = hit
                self.fast[kind] = (hit.path, hit.cache, hit.rules)
        return hit


def compile_rules(ruleset: RuleSet, labels_of: LabelsOf = lambda ve: {}, impl: ModuleType = native.impl) -> Compiled:
    """``impl``: :mod:`.decide` or the C ``_decide`` (default: :data:`.native.impl`)."""
    rules: list[CompiledRule] = []
    by_kind: dict[str, list[CompiledRule]] = {}
    wildcard: list[tuple[tuple[str, ...], CompiledRule]] = []
    for i, rule in enumerate(r for r in ruleset.rules if r.enabled):
        cr = compiled_rule(i, rule, labels_of, impl=impl)
        rules.append(cr)
        exact = [k for k in rule.match.kinds if not k.endswith("*")]
        prefixes = tuple(k[:-1] for k in rule.match.kinds if k.endswith("*"))
        for k in exact:
            by_kind.setdefault(k, []).append(cr)
        if prefixes or not rule.match.kinds:
            wildcard.append((prefixes, cr))
    return Compiled(rules, by_kind, wildcard, {}, labels_of, impl)

"""The C decision loop (``rules/_decide.c``) against its Python reference (``rules/decide.py``).

Both run the same steps over the same state shapes; on any rules and any event stream they
must give the same decisions, the same windows and cooldowns, and the same counters.
"""

from __future__ import annotations

import math
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fsnotifyd.rules import decide, native
from fsnotifyd.rules.engine import Engine
from fsnotifyd.rules.schema import OPERATORS, Action, Condition, Match, Rule, RuleSet, Threshold, VeSelector
from tests.unit.test_rules_engine import TestGeneratedPredicates as _Predicates  # not collected twice


def test_the_c_core_is_built_and_chosen():
    """`make test` bootstraps, which builds the C modules: a missing build is a failure, not
    a quiet fall back to the slower reference (unless FSNOTIFYD_PURE_PYTHON asks for it)."""
    if os.environ.get("FSNOTIFYD_PURE_PYTHON"):
        pytest.skip("FSNOTIFYD_PURE_PYTHON is set: the reference is chosen on purpose")
    assert native.NATIVE, native.reason
    from fsnotifyd.rules import _decide

    assert native.impl is _decide and _decide.OPS == decide.OPS


pytestmark = pytest.mark.skipif(not native.NATIVE, reason=f"C core not built: {native.reason}")

VES = ["101", "102", "7", None]
DEVICES = ["loop0", "loop1", None]
KINDS = ["fs.error", "fs.readonly", "fs.writable", "blk.io_error", "dev.change", "quota.warning"]

_scalar = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(-3, 3, allow_nan=False),
                    st.sampled_from(["ext4_lookup", "EIO", "loop0", "", "1789", "é", "101"]))
_value = st.one_of(_scalar, st.lists(st.integers(0, 2), max_size=2), st.dictionaries(st.just("x"), st.integers(0, 1)))
_fields = st.sampled_from(["ve", "count", "device.name", "kernel.function", "kernel.line", "kernel.errno.name",
                           "details.reason", "details.a.b", "kind"])


@st.composite
def conditions(draw):
    """Conditions as the generated-predicate property test makes them, with real regexes."""
    op = draw(st.sampled_from(sorted(OPERATORS)))
    c = _Predicates._condition(op, draw(_fields), draw(_value))
    if op == "regex":
        c = Condition(c.field, op, draw(st.sampled_from(["ext4_.*", "E(IO|BADMSG)", r"\d+", "loop[01]", "x"])))
    return c


@st.composite
def rules(draw, i):
    kinds = draw(st.sampled_from([("fs.error",), ("fs.readonly",), ("fs.*",), (), ("fs.error", "blk.io_error"),
                                  ("dev.change",)]))
    conds = tuple(draw(st.lists(conditions(), max_size=2)))
    ve = draw(st.sampled_from([None, VeSelector(ids=("101", "7")), VeSelector(labels=(("tier", "gold"),)),
                               VeSelector(ids=("101",), labels=(("tier", "gold"),))]))
    threshold = draw(st.one_of(st.none(), st.builds(Threshold, st.integers(1, 4), st.sampled_from([1.0, 2.0, 5.0]),
                                                    st.sampled_from(["ve", "device"]))))
    return Rule(name=f"r{i}", match=Match(kinds, conds, ve), actions=(Action("notify"),),
                threshold=threshold, cooldown=draw(st.sampled_from([0.0, 1.0, 2.0, 5.0])),
                continue_=draw(st.booleans()) or draw(st.booleans()), dry_run=draw(st.booleans()),
                reset_on=draw(st.sampled_from([(), ("fs.writable",), ("blk.io_error",)])))


@st.composite
def events(draw):
    n = draw(st.integers(1, 40))
    t = 1000.0
    out = []
    for i in range(n):
        # Steps that land exactly on window and cooldown edges, and now and then go backwards.
        t += draw(st.sampled_from([0.0, 0.5, 1.0, 1.0, 2.0, 5.0, 30.0, -1.0]))
        e = {"kind": draw(st.sampled_from(KINDS + [None, 5])), "time": t}
        if draw(st.booleans()):
            e["id"] = draw(st.sampled_from([f"e{i}", None, i]))
        ve = draw(st.sampled_from(VES + ["missing"]))
        if ve != "missing":
            e["ve"] = ve
        dev = draw(st.sampled_from(DEVICES + ["missing", "garbage"]))
        if dev == "garbage":
            e["device"] = draw(_value)
        elif dev != "missing":
            e["device"] = {"name": dev, "major": 7}
        count = draw(st.sampled_from([1, 1, 2, 5, 0, -1, True, "3", 2**70, None, "missing"]))
        if count != "missing":
            e["count"] = count
        e["kernel"] = {"function": draw(_scalar), "line": draw(_scalar),
                       "errno": draw(st.one_of(st.none(), st.builds(lambda n: {"name": n}, _scalar)))}
        e["details"] = draw(st.dictionaries(st.sampled_from(["reason", "what", "a"]),
                                            st.one_of(_scalar, st.just({"b": 1}), st.just("detach"))))
        stamp = draw(st.sampled_from(["float", "float", "none", "text"]))
        out.append((e, t if stamp == "float" else None, stamp))
        if stamp == "text":
            e["time"] = f"2026-11-25T10:00:{int(t) % 60:02d}Z"
    return out


def _labels(ve):
    return {"tier": "gold"} if ve in ("101", "102") else {}


def _run(impl, ruleset, stream, batch):
    e = Engine(ruleset, labels_of=_labels, max_keys=3, explain=True, impl=impl)
    decisions = []
    if batch:
        decisions = e.process_timed([(t if t is not None else e_["time"] if isinstance(e_["time"], float) else 0.0, e_)
                                     for e_, t, _ in stream])
    else:
        for ev, t, _ in stream:
            decisions.extend(e.process(ev, t) if t is not None else e.process(ev))
    return decisions, e


@settings(max_examples=500, deadline=None)
@given(st.integers(1, 6).flatmap(lambda n: st.tuples(*[rules(i) for i in range(n)])), events(), st.booleans())
def test_c_and_python_decide_identically(rule_list, stream, batch):
    ruleset = RuleSet(tuple(rule_list))
    got, c = _run(native.impl, ruleset, stream, batch)
    want, py = _run(decide, ruleset, stream, batch)
    assert [tuple(d) for d in got] == [tuple(d) for d in want]
    assert all(type(d) is type(w) for d, w in zip(got, want, strict=True))
    assert c._windows == py._windows and list(c._windows) == list(py._windows)
    assert c._cooldowns == py._cooldowns and list(c._cooldowns) == list(py._cooldowns)
    assert c.stats == py.stats and c.dirty == py.dirty


def test_decisions_equal_the_python_ones_on_a_storm():
    """A long storm through thresholds, cooldowns and eviction, both ways, decision for decision."""
    ruleset = RuleSet((
        Rule("first", Match(("fs.error",)), (Action("snapshot"),), cooldown=60.0),
        Rule("three", Match(("fs.error",), (Condition("kernel.function", "in", ("a", "b")),)), (Action("isolate"),),
             threshold=Threshold(3, 30.0), cooldown=120.0),
        Rule("dev", Match(("fs.*",)), (Action("notify"),), threshold=Threshold(5, 10.0, "device")),
    ))
    stream = [({"kind": "fs.error", "id": f"e{i}", "ve": str(i % 7), "count": 1 + i % 3,
                "device": {"name": f"loop{i % 5}"}, "kernel": {"function": "abc"[i % 3]}}, 1000.0 + i * 0.7, "")
              for i in range(5000)]
    got, c = _run(native.impl, ruleset, stream, True)
    want, py = _run(decide, ruleset, stream, True)
    assert len(got) > 5000 and [tuple(d) for d in got] == [tuple(d) for d in want]
    assert c.stats == py.stats and c.stats.fired > 0 and c.stats.evicted > 0


def test_cooling_left_and_totals_are_numbers_as_in_python():
    r = Rule("r", Match(("fs.error",)), (Action("notify"),), threshold=Threshold(2, 10.0), cooldown=100.0)
    out = {}
    for impl in (native.impl, decide):
        e = Engine(RuleSet((r,)), impl=impl)
        ds = []
        for i in range(4):
            ds += e.process({"kind": "fs.error", "id": f"e{i}", "ve": "1"}, 10.0 + i)
        out[impl] = ds
    c, p = out[native.impl], out[decide]
    assert [d.outcome for d in c] == ["threshold", "fired", "threshold", "cooldown"] == [d.outcome for d in p]
    assert c[3].cooling_left == p[3].cooling_left == pytest.approx(98.0)  # fired at 11, now 13
    assert c[1].event_ids == ("e0", "e1") and c[3].detail == p[3].detail
    assert not math.isnan(c[3].cooling_left)


def test_a_bad_candidate_list_is_an_error_not_a_crash():
    """The C core checks what the Python side hands it."""
    from fsnotifyd.rules import _decide

    core = _decide.Core({"fs.error": (None, {}, ["not a rule"])}, lambda k, e: [], frozenset(), lambda k, e: None,
                        {}, {}, tuple, lambda e: 0.0, 10, True)
    with pytest.raises(TypeError, match="CompiledRule"):
        core.process({"kind": "fs.error"}, 1.0)
    with pytest.raises(ValueError, match="opcode"):
        _decide.CompiledRule(0, object(), None, ((("a",), 99, None),))

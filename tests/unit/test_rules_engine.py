"""The rules engine: matchers, thresholds, windows, cooldowns, continue, dry-run, recovery, state."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fsnotifyd.rules.compiler import condition, getter
from fsnotifyd.rules.engine import COOLDOWN, FIRED, THRESHOLD, Engine
from fsnotifyd.rules.schema import OPERATORS, Action, Condition, Match, Rule, RuleSet, Threshold, VeSelector

EV = {"id": "e1", "time": 100.0, "kind": "fs.error", "ve": "101", "count": 1,
      "device": {"major": 7, "minor": 3, "name": "loop3"},
      "kernel": {"errno": {"name": "EUCLEAN", "number": 117}, "function": "ext4_lookup", "line": 1789,
                 "message": "deleted inode referenced: 18", "inode": 12},
      "details": {"reason": "journal_aborted"}}


def ev(**kw):
    e = {**EV, **kw}
    return e


def rule(name="r", kinds=("fs.error",), conds=(), threshold=None, cooldown=0.0, cont=True, dry=False,
         ve=None, reset_on=(), actions=(Action("snapshot"),)):
    return Rule(name=name, match=Match(tuple(kinds), tuple(conds), ve), actions=tuple(actions),
                threshold=threshold, cooldown=cooldown, continue_=cont, dry_run=dry, reset_on=tuple(reset_on))


def engine(*rules, **kw):
    return Engine(RuleSet(tuple(rules)), **kw)


class TestMatchers:
    @pytest.mark.parametrize("field,op,value,expected", [
        ("kernel.function", "equals", "ext4_lookup", True),
        ("kernel.function", "equals", "other", False),
        ("kernel.function", "ne", "other", True),
        ("kernel.errno.name", "in", ("EUCLEAN", "EBADMSG"), True),
        ("kernel.errno.name", "in", ("EIO",), False),
        ("kernel.errno.name", "not_in", ("EIO",), True),
        ("kernel.errno.name", "in_list", ("EUCLEAN",), True),
        ("kernel.message", "regex", r"deleted inode referenced: \d+", True),
        ("kernel.message", "regex", r"deleted", False),  # full match, not search
        ("kernel.line", "regex", r"17\d\d", True),  # numbers are matched as text
        ("device.name", "prefix", "loop", True),
        ("device.name", "suffix", "3", True),
        ("kernel.message", "contains", "inode", True),
        ("kernel.line", "gt", 1000, True),
        ("kernel.line", "ge", 1789, True),
        ("kernel.line", "lt", 1789, False),
        ("kernel.line", "le", 1789, True),
        ("count", "gt", 5, False),
        ("kernel.comm", "exists", False, True),
        ("kernel.inode", "exists", True, True),
        ("details.reason", "equals", "journal_aborted", True),
        ("kernel.nothing.deeper", "equals", None, True),
        ("kernel.function", "gt", 3, False),  # a string is never greater than a number
    ])
    def test_operator(self, field, op, value, expected):
        """Each operator on a real-shaped event."""
        assert condition(Condition(field, op, value))(EV) is expected

    def test_getter_tolerates_wrong_shapes(self):
        """A path through a non-object gives None, never an exception."""
        assert getter("device.name")({"device": None}) is None
        assert getter("a.b.c")({"a": {"b": 3}}) is None

    def test_kind_prefix_and_any_kind(self):
        """'fs.*' matches fs kinds only; no kinds matches everything."""
        e = engine(rule("p", kinds=("fs.*",)), rule("any", kinds=()))
        assert [d.rule for d in e.process(ev(kind="fs.readonly"))] == ["p", "any"]
        assert [d.rule for d in e.process(ev(kind="dev.add"))] == ["any"]

    def test_ve_selector_by_id_and_labels(self):
        """VE selectors match ids and labels from the inventory."""
        labels = {"101": {"tier": "gold"}, "102": {"tier": "bronze"}}
        e = engine(rule("gold", ve=VeSelector(labels=(("tier", "gold"),))), rule("ids", ve=VeSelector(ids=("102",))),
                   labels_of=lambda ve: labels.get(ve, {}))
        assert [d.rule for d in e.process(ev(ve="101"))] == ["gold"]
        assert [d.rule for d in e.process(ev(ve="102"))] == ["ids"]
        assert e.process(ev(ve=None)) == []


class TestThreshold:
    def test_fires_on_the_nth_within_the_window(self):
        """Three errors within 600 s fire on the third; the window then starts afresh."""
        e = engine(rule(threshold=Threshold(3, 600.0)))
        outs = [e.process(ev(id=f"e{i}", time=100.0 + i))[0] for i in range(4)]
        assert [d.outcome for d in outs] == [THRESHOLD, THRESHOLD, FIRED, THRESHOLD]
        assert outs[2].event_ids == ("e0", "e1", "e2") and outs[2].detail == "3/3 within 10m"

    def test_window_edge_is_inclusive(self):
        """An event exactly `within` seconds old still counts; a microsecond older does not."""
        e = engine(rule(threshold=Threshold(2, 60.0)))
        e.process(ev(time=100.0))
        assert e.process(ev(time=160.0))[0].outcome == FIRED
        e = engine(rule(threshold=Threshold(2, 60.0)))
        e.process(ev(time=100.0))
        assert e.process(ev(time=160.000001))[0].outcome == THRESHOLD

    def test_counts_kernel_facts_not_events(self):
        """An aggregated event with count 5 meets a threshold of 3 by itself; count 0 adds nothing."""
        e = engine(rule(threshold=Threshold(3, 60.0)))
        assert e.process(ev(count=0))[0].outcome == THRESHOLD
        assert e.process(ev(count=5))[0].outcome == FIRED

    def test_per_ve_and_per_device(self):
        """Windows are kept per VE (falling back to the device) or per device."""
        e = engine(rule("v", threshold=Threshold(2, 60.0)), rule("d", threshold=Threshold(2, 60.0, per="device")))
        e.process(ev(ve="101", device={"name": "loop3"}))
        out = {d.rule: d.outcome for d in e.process(ev(ve="101", device={"name": "loop4"}))}
        assert out == {"v": FIRED, "d": THRESHOLD}
        e2 = engine(rule("v", threshold=Threshold(2, 60.0)))
        e2.process(ev(ve=None))
        d = e2.process(ev(ve=None))[0]
        assert d.outcome == FIRED and d.key == "dev:loop3"

    def test_window_memory_stays_bounded_through_a_storm_in_cooldown(self):
        """However many events arrive while cooling down, a window holds at most `count` entries."""
        e = engine(rule(threshold=Threshold(3, 600.0), cooldown=3600.0))
        for i in range(10_000):
            e.process(ev(id=f"e{i}", time=100.0 + i * 0.01))
        [(total, entries)] = e._windows.values()
        assert len(entries) <= 3 and total == sum(c for _, c, _ in entries)


class TestCooldown:
    def test_cooldown_edge(self):
        """Within the cooldown the rule is suppressed; at exactly its end it fires again."""
        e = engine(rule(cooldown=60.0))
        assert e.process(ev(time=100.0))[0].outcome == FIRED
        d = e.process(ev(time=159.9))[0]
        assert d.outcome == COOLDOWN and "cooling down" in d.detail
        assert e.process(ev(time=160.0))[0].outcome == FIRED

    def test_cooldown_is_per_ve(self):
        """Another VE is not cooled down by the first one's firing."""
        e = engine(rule(cooldown=60.0))
        e.process(ev(ve="101"))
        assert e.process(ev(ve="102"))[0].outcome == FIRED


class TestContinueAndDryRun:
    def test_continue_false_hides_the_event_once_fired(self):
        """A firing rule with continue: false stops later rules; a suppressed one does not."""
        e = engine(rule("stop", cont=False, threshold=Threshold(2, 60.0)), rule("later"))
        assert [d.rule for d in e.process(ev(time=1.0))] == ["stop", "later"]
        assert [d.rule for d in e.process(ev(time=2.0))] == ["stop"]

    def test_dry_run_is_carried_on_the_decision(self):
        """Dry-run rules decide normally and say so."""
        d = engine(rule(dry=True)).process(ev())[0]
        assert d.outcome == FIRED and d.dry_run is True

    def test_disabled_rules_do_not_match(self):
        """enabled: false removes the rule from matching."""
        r = rule("off")
        r = Rule(**{**{f: getattr(r, f) for f in r.__slots__}, "enabled": False})
        assert engine(r).process(ev()) == []


class TestRecovery:
    def test_writable_clears_readonly_state(self):
        """fs.writable ends the read-only condition: cooldown and window start over."""
        e = engine(rule("ro", kinds=("fs.readonly",), cooldown=3600.0))
        assert e.process(ev(kind="fs.readonly", time=1.0))[0].outcome == FIRED
        assert e.process(ev(kind="fs.readonly", time=2.0))[0].outcome == COOLDOWN
        e.process(ev(kind="fs.writable", time=3.0))
        assert e.process(ev(kind="fs.readonly", time=4.0))[0].outcome == FIRED

    def test_device_gone_clears_everything_about_it(self):
        """dev.remove and a loop detach clear every rule's state for that device and VE."""
        for gone in ({"kind": "dev.remove"}, {"kind": "dev.change", "details": {"what": "detach"}}):
            e = engine(rule(threshold=Threshold(2, 600.0)))
            e.process(ev(time=1.0))
            e.process(ev(time=2.0, **gone))
            assert e.process(ev(time=3.0))[0].outcome == THRESHOLD

    def test_reset_on(self):
        """A rule's own reset_on kinds clear its state."""
        e = engine(rule(threshold=Threshold(2, 600.0), reset_on=("fs.warning",)))
        e.process(ev(time=1.0))
        e.process(ev(kind="fs.warning", time=2.0))
        assert e.process(ev(time=3.0))[0].outcome == THRESHOLD


class TestState:
    def test_state_survives_a_restart(self):
        """Windows and cooldowns saved and restored decide as if never stopped."""
        rules = (rule("t", threshold=Threshold(3, 600.0)), rule("c", kinds=("fs.readonly",), cooldown=600.0))
        a = engine(*rules)
        a.process(ev(time=1.0))
        a.process(ev(time=2.0))
        a.process(ev(kind="fs.readonly", time=3.0))
        b = engine(*rules)
        assert b.restore(a.state()) == 2
        assert b.process(ev(time=4.0))[0].outcome == FIRED
        assert b.process(ev(kind="fs.readonly", time=5.0))[0].outcome == COOLDOWN

    def test_state_of_removed_rules_is_dropped(self):
        """Restoring into a rule set without that rule ignores its state."""
        a = engine(rule("gone", threshold=Threshold(3, 600.0)))
        a.process(ev())
        assert engine(rule("other")).restore(a.state()) == 0
        assert engine(rule("other")).restore({"version": 99}) == 0

    def test_keys_are_bounded(self):
        """At most max_keys states are kept; the least recently used go first."""
        e = engine(rule(threshold=Threshold(5, 600.0)), max_keys=100)
        for i in range(1000):
            e.process(ev(ve=f"ve{i}"))
        assert len(e._windows) == 100 and e.stats.evicted == 900

    def test_same_input_same_decisions(self):
        """Deciding is a pure function of the events."""
        events = [ev(id=f"e{i}", time=float(i), ve=f"{i % 3}") for i in range(50)]
        rules = (rule("a", threshold=Threshold(2, 5.0), cooldown=10.0), rule("b", cont=False))
        one = [d.to_dict() for d in engine(*rules).process_all(events)]
        two = [d.to_dict() for d in engine(*rules).process_all(events)]
        assert one == two and one


class TestGeneratedPredicates:
    from hypothesis import given as _given
    from hypothesis import settings as _settings
    from hypothesis import strategies as _st

    _values = _st.one_of(_st.none(), _st.booleans(), _st.integers(-3, 3), _st.floats(-3, 3, allow_nan=False),
                         _st.sampled_from(["ext4_lookup", "loop3", "EIO", "", "1789", "a.b"]),
                         _st.lists(_st.integers(0, 2), max_size=2), _st.dictionaries(_st.just("x"), _st.integers(0, 1)))
    _fields = _st.sampled_from(["kind", "ve", "count", "device.name", "kernel.function", "kernel.line",
                                "kernel.errno.name", "details.reason", "details.a.b"])

    @staticmethod
    def _condition(draw_op, field, value):
        import re as _re

        op = draw_op
        if op in ("in", "not_in", "in_list"):
            value = tuple(v for v in (value if isinstance(value, list) else [value]) if not isinstance(v, (list, dict)))
        elif op == "regex":
            value = _re.escape(str(value)[:6]) or "x"
        elif op in ("prefix", "suffix", "contains"):
            value = str(value)[:3]
        elif op in ("gt", "ge", "lt", "le"):
            value = value if isinstance(value, (int, float)) and not isinstance(value, bool) else 1
        elif op == "exists":
            value = bool(value)
        elif isinstance(value, (list, dict)):
            value = None
        return Condition(field, op, value)

    @_settings(max_examples=400, deadline=None)
    @_given(_st.lists(_st.tuples(_st.sampled_from(sorted(OPERATORS)), _fields, _values),
                      min_size=1, max_size=3),
            _st.dictionaries(_st.sampled_from(["kind", "ve", "count", "device", "kernel", "details"]),
                             _st.one_of(_values, _st.dictionaries(_st.sampled_from(["name", "function", "line", "errno",
                                                                                     "reason", "a"]),
                                                                  _st.one_of(_values, _st.dictionaries(
                                                                      _st.sampled_from(["name", "b"]), _values))))),
            _st.booleans())
    def test_generated_code_agrees_with_the_closures(self, raw, event, with_ve):
        """The generated flat predicate answers exactly as the reference closures, on any event."""
        from fsnotifyd.rules.compiler import closure_predicate, match_predicate

        conds = tuple(self._condition(op, f, v) for op, f, v in raw)
        m = Match(("fs.error",), conds, VeSelector(ids=("101",), labels=(("tier", "gold"),)) if with_ve else None)
        labels = lambda ve: {"tier": "gold"} if ve == "101" else {}  # noqa: E731
        assert match_predicate(m, labels)(event) == closure_predicate(m, labels)(event)


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                     lambda inner: (st.lists(inner, max_size=3)
                                    | st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                     max_leaves=8)


class TestGarbageEvents:
    @settings(max_examples=300, deadline=None)
    @given(st.dictionaries(st.sampled_from(["kind", "ve", "count", "time", "id", "device", "kernel", "details"]),
                           _JSON, max_size=8))
    def test_hand_edited_events_never_crash_the_engine(self, event):
        """Whatever shape a (hand-edited) log event has, deciding on it never raises."""
        event.setdefault("kind", "fs.error")
        e = engine(rule("a", threshold=Threshold(2, 60.0), cooldown=5.0, ve=VeSelector(ids=("101",))),
                   rule("b", kinds=("fs.*",), conds=(Condition("kernel.function", "in", ("x",)),)),
                   rule("c", kinds=(), conds=(Condition("count", "ge", 1),)))
        e.process(event)
        e.process(dict(event, kind="dev.change", details={"what": "detach"}))

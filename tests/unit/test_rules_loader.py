"""Rules loading: the model built from valid files, and every mistake named by file:line:column and field."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fsnotifyd.errors import FsnotifydError, RuleError, RuleErrors
from fsnotifyd.rules.compiler import compile_rules
from fsnotifyd.rules.loader import (
    EVENT_FIELDS,
    MATCH_KEYS,
    RULE_KEYS,
    RULE_KINDS,
    THRESHOLD_KEYS,
    TOP_KEYS,
    check_paths,
    check_text,
    load_rules,
    parse_duration,
    parse_rules,
)
from fsnotifyd.rules.schema import ACTIONS, OPERATORS, Action, Condition, Origin, RuleSet, Threshold, VeSelector

SCHEMA_JSON = Path(__file__).resolve().parents[2] / "rules" / "schema.json"

FULL = """\
version: 1
lists:
  metadata_functions: [ext4_lookup, __ext4_iget]
fragments:
  corruption:
    kind: fs.error
    where: {kernel.errno.name: {in: [EUCLEAN, EBADMSG]}}
rules:
  - name: first-error-snapshot
    description: "snapshot on corruption"
    enabled: true
    match:
      use: corruption
      where:
        kernel.function: {in_list: metadata_functions}
        count: {ge: 1}
        device.name: loop3
        details.reason: {regex: "journal.*"}
      ve: "101"
    threshold: {count: 3, within: 10m, per: ve}
    cooldown: 30m
    actions:
      - snapshot: {keep: 5}
      - fsck: {mode: check}
      - isolate
    dry_run: false
    continue: true
    reset_on: [fs.writable]
"""


def rule_text(extra: str = "", match: str = "{kind: fs.error}", actions: str = "[isolate]", name: str = "r") -> str:
    """One small valid rule (lines 1-4), with ``extra`` lines appended from line 5."""
    return f"rules:\n  - name: {name}\n    match: {match}\n    actions: {actions}\n{extra}"


def errors_of(text: str, file: str = "f.yaml") -> list[RuleError]:
    with pytest.raises(RuleErrors) as ei:
        parse_rules(text, file)
    return ei.value.errors


# ------------------------------------------------------------------------------------------------
# valid files


class TestValid:
    def test_full_example_builds_the_model(self):
        """The documented example loads to exactly the expected rule."""
        rs = parse_rules(FULL, "full.yaml")
        assert isinstance(rs, RuleSet) and rs.files == ("full.yaml",)
        assert rs.lists == {"metadata_functions": ("ext4_lookup", "__ext4_iget")}
        [r] = rs.rules
        assert r.name == "first-error-snapshot" and r.description == "snapshot on corruption"
        assert r.enabled and not r.dry_run and r.continue_
        assert r.match.kinds == ("fs.error",)  # from the fragment
        assert [(c.field, c.op, c.value) for c in r.match.conditions] == [
            ("kernel.errno.name", "in", ("EUCLEAN", "EBADMSG")),  # fragment conditions first
            ("kernel.function", "in", ("ext4_lookup", "__ext4_iget")),  # in_list resolved
            ("count", "ge", 1),
            ("device.name", "equals", "loop3"),  # bare scalar
            ("details.reason", "regex", "journal.*"),
        ]
        assert r.match.ve == VeSelector(ids=("101",))
        assert r.threshold == Threshold(count=3, within=600.0, per="ve")
        assert r.cooldown == 1800.0
        assert r.actions == (Action("snapshot", (("keep", 5),), r.actions[0].origin),
                             Action("fsck", (("mode", "check"),), r.actions[1].origin),
                             Action("isolate", (), r.actions[2].origin))
        assert r.reset_on == ("fs.writable",)

    def test_every_object_has_an_origin(self):
        """Rules, conditions and actions remember file:line:column; fragment conditions point into the fragment."""
        [r] = parse_rules(FULL, "full.yaml").rules
        assert r.origin == Origin("full.yaml", 9, 5)
        assert r.match.conditions[0].origin == Origin("full.yaml", 7, 33)  # the "in" in the fragment
        assert r.match.conditions[3].origin == Origin("full.yaml", 17, 9)  # device.name key
        assert [str(a.origin) for a in r.actions] == ["full.yaml:23:9", "full.yaml:24:9", "full.yaml:25:9"]

    def test_defaults(self):
        """Optional fields take the schema defaults."""
        [r] = parse_rules(rule_text()).rules
        assert (r.enabled, r.dry_run, r.continue_, r.threshold, r.cooldown, r.reset_on, r.description) == (
            True, False, True, None, 0.0, (), "")
        assert r.match.conditions == () and r.match.ve is None

    @pytest.mark.parametrize("value, seconds", [
        ("30", 30.0), ("1.5", 1.5), ("0", 0.0), ("'30s'", 30.0), ("10m", 600.0), ("1h", 3600.0), ("2d", 172800.0),
        ("1h30m", 5400.0), ("500ms", 0.5), ("1d2h3m4s5ms", 93784.005), ("1.5h", 5400.0),
    ])
    def test_durations(self, value, seconds):
        """Numbers are seconds; strings take d/h/m/s/ms units, largest first."""
        [r] = parse_rules(rule_text(f"    cooldown: {value}\n")).rules
        assert r.cooldown == pytest.approx(seconds)

    @pytest.mark.parametrize("text", ["", "1 h", "h", "10", "30m1h", "1m1m", "-5s", "1w", "ms", True, None, [1]])
    def test_parse_duration_rejects(self, text):
        """Not durations: no unit, spaces, wrong order, repeats, unknown units, negatives, other types."""
        assert parse_duration(text) is None

    @pytest.mark.parametrize("ve, expected", [
        ('"101"', VeSelector(ids=("101",))),
        ("101", VeSelector(ids=("101",))),
        ('["101", "102"]', VeSelector(ids=("101", "102"))),
        ("{ids: [a1, b2], labels: {tier: gold, rack: 7}}", VeSelector(ids=("a1", "b2"),
                                                                     labels=(("tier", "gold"), ("rack", "7")))),
        ("{labels: {tier: gold}}", VeSelector(labels=(("tier", "gold"),))),
    ])
    def test_ve_forms(self, ve, expected):
        """A VE id, a list of them, or {ids, labels}."""
        [r] = parse_rules(rule_text(match=f"{{kind: fs.error, ve: {ve}}}")).rules
        assert r.match.ve == expected

    def test_actions_bare_null_and_params(self):
        """Actions as bare names, names with no parameters, and full parameter mappings."""
        text = rule_text(actions="\n      - isolate\n      - snapshot:\n      - isolate: {mode: freeze}\n"
                                 "      - notify: {message: hi, severity: critical, channel: ops}\n"
                                 "      - shrink: {mode: trim, target: 10G, margin: 5}\n"
                                 "      - exec: {command: [/usr/bin/logger, '-t', fsn], timeout: 30s}\n"
                                 "      - fsck: {mode: repair, priority: 2}")
        [r] = parse_rules(text).rules
        assert [a.to_dict() for a in r.actions] == [
            {"isolate": {}}, {"snapshot": {}}, {"isolate": {"mode": "freeze"}},
            {"notify": {"message": "hi", "severity": "critical", "channel": "ops"}},
            {"shrink": {"mode": "trim", "target": "10G", "margin": 5}},
            {"exec": {"command": ("/usr/bin/logger", "-t", "fsn"), "timeout": "30s"}},
            {"fsck": {"mode": "repair", "priority": 2}},
        ]

    @pytest.mark.parametrize("rule_kind, frag_kind, kinds", [
        (None, "fs.error", ("fs.error",)),
        ("fs.*", "fs.error", ("fs.error",)),
        ("[fs.error, fs.readonly]", "[fs.readonly, blk.io_error]", ("fs.readonly",)),
        ("fs.*", "fs.*", ("fs.*",)),
        ("[fs.error, dev.add]", "dev.*", ("dev.add",)),
    ])
    def test_fragment_kinds(self, rule_kind, frag_kind, kinds):
        """Fragment kinds apply when the rule has none; when both have kinds they are intersected."""
        match = "{use: f}" if rule_kind is None else f"{{kind: {rule_kind}, use: f}}"
        text = f"fragments:\n  f: {{kind: {frag_kind}}}\n" + rule_text(match=match)
        [r] = parse_rules(text).rules
        assert r.match.kinds == kinds

    def test_several_fragments(self):
        """use: [a, b] adds both fragments' conditions, in order, then the rule's own."""
        text = ("fragments:\n  a: {where: {fs: ext4}}\n  b: {kind: fs.*, where: {count: {gt: 2}}}\n"
                + rule_text(match="{use: [a, b], where: {device.name: {prefix: loop}}}"))
        [r] = parse_rules(text).rules
        assert r.match.kinds == ("fs.*",)
        assert [(c.field, c.op) for c in r.match.conditions] == [("fs", "equals"), ("count", "gt"),
                                                                 ("device.name", "prefix")]

    def test_conditions_all_operators(self):
        """Every operator with a valid value; several operators on one field make several conditions."""
        where = ("{kernel.line: {gt: 1, ge: 1.5, lt: 10, le: 10}, kernel.comm: {exists: false},"
                 " kernel.message: {contains: x, prefix: a, suffix: b, regex: 'a.*b'},"
                 " severity: {ne: info, not_in: [debug]}, fs: {equals: null}, details.a.b: 3}")
        [r] = parse_rules(rule_text(match=f"{{where: {where}}}")).rules
        ops = {(c.field, c.op) for c in r.match.conditions}
        assert ops >= {("kernel.line", o) for o in ("gt", "ge", "lt", "le")}
        assert ("details.a.b", "equals") in ops and ("fs", "equals") in ops
        assert {c.op for c in r.match.conditions} == OPERATORS - {"in", "in_list"}
        assert r.match.kinds == ()  # no kind: any kind

    @pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n", "~\n", "{}\n", "rules:\n", "rules: []\n",
                                      "version: 1\nlists:\nfragments:\nrules:\n"])
    def test_empty_files_are_ok(self, text):
        """An empty rules file (or empty sections) means no rules."""
        assert parse_rules(text).rules == ()

    def test_disabled_rule_is_kept_and_still_checked(self):
        """enabled: false keeps the rule (compiler skips it), but its mistakes are still errors."""
        [r] = parse_rules(rule_text("    enabled: false\n")).rules
        assert r.enabled is False
        [e] = errors_of(rule_text("    enabled: false\n    cooldown: soon\n"))
        assert (e.line, e.field) == (6, "rules[0].cooldown")

    def test_loaded_rules_compile_and_match(self):
        """What the loader builds is what the compiler accepts."""
        compiled = compile_rules(parse_rules(FULL))
        [cr] = compiled.for_kind("fs.error")
        event = {"kind": "fs.error", "ve": "101", "count": 1, "device": {"name": "loop3"},
                 "kernel": {"errno": {"name": "EUCLEAN"}, "function": "__ext4_iget"},
                 "details": {"reason": "journal_aborted"}}
        assert cr.predicate(event)
        assert not cr.predicate({**event, "kernel": {"errno": {"name": "EIO"}, "function": "__ext4_iget"}})


# ------------------------------------------------------------------------------------------------
# broken files: (text, line, column, field, a word of the message)

L = "lists:\n  fns: [ext4_lookup]\n"  # 2 lines of lists before a rule
F = "fragments:\n  io: {kind: blk.io_error}\n"  # 2 lines of fragments before a rule

BROKEN = [
    # top level
    ("rulez: []\n", 1, 1, "rulez", "unknown key"),
    ("version: 2\n", 1, 10, "version", "unsupported version"),
    ("version: 1.0\n", 1, 10, "version", "unsupported version"),
    ("version: 1\nversion: 1\n", 2, 1, "version", "duplicate key"),
    ("- a\n- b\n", 1, 1, None, "wrong type"),
    ("rules: {}\n", 1, 8, "rules", "wrong type"),
    ("rules: 5\n", 1, 8, "rules", "integer"),
    ("rules:\n  - name: [\n", 3, 1, None, "not valid YAML"),
    ("rules:\n  - name: r\x07\n", 2, 12, None, "not allowed"),
    (rule_text("    description: !!python/object/apply:os.system [ls]\n"), 5, 18, "rules[0].description", "tag"),
    (rule_text(match="{<<: {kind: fs.error}}"), 3, 13, "rules[0].match.<<", "merge"),
    ("rules: !!str [a]\n", 1, 8, "rules", "not allowed on a list"),
    (rule_text(match="{where: {fs: !!int x}}"), 3, 25, "rules[0].match.where.fs", "cannot read value"),
    # rule keys and names
    ("rules:\n  - match: {kind: fs.error}\n    actions: [isolate]\n", 2, 5, "rules[0].name", "missing"),
    (rule_text(name="Bad_Name"), 2, 11, "rules[0].name", "invalid name"),
    (rule_text(name="[a]"), 2, 11, "rules[0].name", "wrong type"),
    (rule_text("    action: [isolate]\n"), 5, 5, "rules[0].action", "unknown key"),
    (rule_text("    name: s\n"), 5, 5, "rules[0].name", "duplicate key"),
    (rule_text() + "  - name: r\n    match: {}\n    actions: [isolate]\n", 5, 11, "rules[1].name",
     "duplicate rule name"),
    ("rules:\n  - just-a-string\n", 2, 5, "rules[0]", "wrong type"),
    (rule_text("    description: [a]\n"), 5, 18, "rules[0].description", "wrong type"),
    (rule_text("    enabled: 'yes'\n"), 5, 14, "rules[0].enabled", "boolean"),
    (rule_text("    dry_run: 1\n"), 5, 14, "rules[0].dry_run", "boolean"),
    (rule_text("    continue: null\n"), 5, 15, "rules[0].continue", "boolean"),
    # match: kinds
    (rule_text(match="fs.error"), 3, 12, "rules[0].match", "wrong type"),
    (rule_text(match="{kind: fs.eror}"), 3, 19, "rules[0].match.kind", "did you mean 'fs.error'"),
    (rule_text(match="{kind: [fs.error, blk.oops]}"), 3, 30, "rules[0].match.kind[1]", "unknown event kind"),
    (rule_text(match="{kind: 'zz.*'}"), 3, 19, "rules[0].match.kind", "matches no known kind"),
    (rule_text(match="{kind: 'fs*'}"), 3, 19, "rules[0].match.kind", "invalid kind pattern"),
    (rule_text(match="{kind: []}"), 3, 19, "rules[0].match.kind", "empty"),
    (rule_text(match="{kinds: fs.error}"), 3, 13, "rules[0].match.kinds", "unknown key"),
    # match: fragments
    (rule_text(match="{use: nope}"), 3, 18, "rules[0].match.use", "unknown fragment"),
    (F + rule_text(match="{kind: fs.error, use: io}"), 5, 34, "rules[0].match.use", "impossible"),
    (F + rule_text(match="{kind: 'fs.*', use: [io]}"), 5, 33, "rules[0].match.use[0]", "impossible"),
    ("fragments:\n  f: {kinds: fs.error}\n", 2, 7, "fragments.f.kinds", "unknown key"),
    ("fragments:\n  f: {}\n", 2, 6, "fragments.f", "empty fragment"),
    ("fragments:\n  f: [fs.error]\n", 2, 6, "fragments.f", "wrong type"),
    # match: where
    (rule_text(match="{where: {kernel.func: x}}"), 3, 21, "rules[0].match.where.kernel.func", "unknown event field"),
    (rule_text(match="{where: {details.: x}}"), 3, 21, "rules[0].match.where.details.", "unknown event field"),
    (rule_text(match="{where: {count: {gte: 1}}}"), 3, 29, "rules[0].match.where.count.gte", "unknown key"),
    (rule_text(match="{where: {count: {}}}"), 3, 28, "rules[0].match.where.count", "empty condition"),
    (rule_text(match="{where: {device.name: [a, b]}}"), 3, 34, "rules[0].match.where.device.name", "not a condition"),
    (rule_text(match="{where: {device: loop3}}"), 3, 29, "rules[0].match.where.device", "only 'exists'"),
    (rule_text(match="{where: {kernel.errno.name: {in: []}}}"), 3, 45, "rules[0].match.where.kernel.errno.name.in",
     "empty list"),
    (rule_text(match="{where: {kernel.errno.name: {in: EIO}}}"), 3, 45, "rules[0].match.where.kernel.errno.name.in",
     "wrong type"),
    (rule_text(match="{where: {kernel.errno.name: {not_in: [[a]]}}}"), 3, 50,
     "rules[0].match.where.kernel.errno.name.not_in[0]", "wrong type"),
    (rule_text(match="{where: {kernel.function: {in_list: nope}}}"), 3, 48,
     "rules[0].match.where.kernel.function.in_list", "unknown list"),
    (L + rule_text(match="{where: {kernel.function: {in_list: fnz}}}"), 5, 48,
     "rules[0].match.where.kernel.function.in_list", "did you mean 'fns'"),
    (rule_text(match="{where: {count: {gt: true}}}"), 3, 33, "rules[0].match.where.count.gt", "boolean"),
    (rule_text(match="{where: {count: {le: many}}}"), 3, 33, "rules[0].match.where.count.le", "expected a number"),
    (rule_text(match="{where: {count: {gt: .nan}}}"), 3, 33, "rules[0].match.where.count.gt", "NaN"),
    (rule_text(match="{where: {kernel.inode: {exists: maybe}}}"), 3, 44, "rules[0].match.where.kernel.inode.exists",
     "boolean"),
    (rule_text(match="{where: {device.name: {prefix: 5}}}"), 3, 43, "rules[0].match.where.device.name.prefix",
     "string"),
    (rule_text(match="{where: {details.x: 2020-01-01}}"), 3, 32, "rules[0].match.where.details.x", "date"),
    # match: ve
    (rule_text(match="{ve: '../x'}"), 3, 17, "rules[0].match.ve", "invalid VE id"),
    (rule_text(match="{ve: [101, 'a b']}"), 3, 23, "rules[0].match.ve[1]", "invalid VE id"),
    (rule_text(match="{ve: {}}"), 3, 17, "rules[0].match.ve", "empty VE selector"),
    (rule_text(match="{ve: {labels: {tier: [a]}}}"), 3, 33, "rules[0].match.ve.labels.tier", "wrong type"),
    (rule_text(match="{ve: {id: 101}}"), 3, 18, "rules[0].match.ve.id", "unknown key"),
    # threshold and cooldown
    (rule_text("    threshold: {count: 0, within: 1m}\n"), 5, 24, "rules[0].threshold.count", "impossible"),
    (rule_text("    threshold: {count: 2000000, within: 1m}\n"), 5, 24, "rules[0].threshold.count", "impossible"),
    (rule_text("    threshold: {count: 2.5, within: 1m}\n"), 5, 24, "rules[0].threshold.count", "integer"),
    (rule_text("    threshold: {count: 3, within: 0}\n"), 5, 35, "rules[0].threshold.within", "out of range"),
    (rule_text("    threshold: {count: 3, within: 31d}\n"), 5, 35, "rules[0].threshold.within", "out of range"),
    (rule_text("    threshold: {count: 3, within: 10 minutes}\n"), 5, 35, "rules[0].threshold.within",
     "not a duration"),
    (rule_text("    threshold: {count: 3, within: 1m, per: host}\n"), 5, 44, "rules[0].threshold.per", "unknown value"),
    (rule_text("    threshold: {count: 3}\n"), 5, 16, "rules[0].threshold.within", "missing"),
    (rule_text("    threshold: 3\n"), 5, 16, "rules[0].threshold", "wrong type"),
    (rule_text("    cooldown: -5\n"), 5, 15, "rules[0].cooldown", "negative"),
    (rule_text("    cooldown: -1m\n"), 5, 15, "rules[0].cooldown", "negative"),
    (rule_text("    cooldown: .inf\n"), 5, 15, "rules[0].cooldown", "not a duration"),
    # reset_on
    (rule_text("    reset_on: [fs.*]\n"), 5, 16, "rules[0].reset_on[0]", "pattern is not allowed"),
    (rule_text("    reset_on: fs.nope\n"), 5, 15, "rules[0].reset_on", "unknown event kind"),
    # actions
    (rule_text(actions="[]"), 4, 14, "rules[0].actions", "no actions"),
    (rule_text(actions="isolate"), 4, 14, "rules[0].actions", "wrong type"),
    (rule_text(actions="[snapshoot]"), 4, 15, "rules[0].actions[0]", "did you mean 'snapshot'"),
    (rule_text(actions="[5]"), 4, 15, "rules[0].actions[0]", "wrong type"),
    (rule_text(actions="[{fsck: {mode: check}, isolate: null}]"), 4, 15, "rules[0].actions[0]", "exactly one key"),
    (rule_text(actions="[{snapshot: {kep: 5}}]"), 4, 27, "rules[0].actions[0].snapshot.kep", "unknown key"),
    (rule_text(actions="[{snapshot: {keep: 0}}]"), 4, 33, "rules[0].actions[0].snapshot.keep", "at least 1"),
    (rule_text(actions="[{snapshot: [keep]}]"), 4, 26, "rules[0].actions[0].snapshot", "wrong type"),
    (rule_text(actions="[{fsck: {mode: check, priority: high}}]"), 4, 46, "rules[0].actions[0].fsck.priority",
     "integer"),
    (rule_text(actions="[{fsck: {mode: check, priority: yes}}]"), 4, 46, "rules[0].actions[0].fsck.priority",
     "boolean"),
    (rule_text(actions="[{fsck: {mode: fix}}]"), 4, 29, "rules[0].actions[0].fsck.mode", "not allowed"),
    (rule_text(actions="[fsck]"), 4, 15, "rules[0].actions[0].fsck.mode", "missing required parameter"),
    (rule_text(actions="[{shrink: {target: 5}}]"), 4, 16, "rules[0].actions[0].shrink.mode", "missing required"),
    (rule_text(actions="[{notify: {severity: loud}}]"), 4, 35, "rules[0].actions[0].notify.severity", "not allowed"),
    (rule_text(actions="[{exec: {command: /bin/true}}]"), 4, 32, "rules[0].actions[0].exec.command", "wrong type"),
    (rule_text(actions="[{exec: {command: []}}]"), 4, 32, "rules[0].actions[0].exec.command", "empty list"),
    (rule_text(actions="[{exec: {command: [/bin/x, 5]}}]"), 4, 41, "rules[0].actions[0].exec.command[1]",
     "wrong type"),
    (rule_text(actions="[{exec: {command: [x], timeout: soon}}]"), 4, 46, "rules[0].actions[0].exec.timeout",
     "duration"),
    # lists
    ("lists:\n  empty: []\n", 2, 10, "lists.empty", "empty list"),
    ("lists:\n  a: x\n", 2, 6, "lists.a", "wrong type"),
    ("lists:\n  a: [{x: 1}]\n", 2, 7, "lists.a[0]", "wrong type"),
    ("lists:\n  bad name: [x]\n", 2, 3, "lists.bad name", "invalid name"),
    ("lists: [a]\n", 1, 8, "lists", "wrong type"),
]


class TestBrokenFiles:
    def test_table_is_large_and_distinct(self):
        assert len(BROKEN) >= 35
        assert len({t for t, *_ in BROKEN}) == len(BROKEN)

    @pytest.mark.parametrize("text, line, column, field, word", BROKEN,
                             ids=[f"{i}-{c[3] or 'top'}" for i, c in enumerate(BROKEN)])
    def test_error_names_line_column_and_field(self, text, line, column, field, word):
        """Each mistake is the only error, at its exact line and column, with the dotted field."""
        errs = errors_of(text, "f.yaml")
        assert len(errs) == 1, "\n".join(map(str, errs))
        [e] = errs
        assert (e.file, e.line, e.column, e.field) == ("f.yaml", line, column, field), str(e)
        assert word in str(e)
        assert str(e).startswith(f"f.yaml:{line}:{column}: ")
        assert "; expected " in str(e) and e.expected
        if field:
            assert f"(field {field!r})" in str(e)

    def test_regex_error_points_at_the_character(self):
        """An invalid regex is reported at the column of the offending character, with its position."""
        text = rule_text(match='{where: {details.reason: {regex: "journal("}}}')
        [e] = errors_of(text)
        line3 = text.splitlines()[2]
        assert e.line == 3 and e.column == line3.index("journal(") + 1 + 7
        assert "position 7" in e.message and "unterminated" in e.message

    def test_unknown_field_lists_valid_ones(self):
        [e] = errors_of(rule_text(match="{where: {kernel.func: x}}"))
        assert "kernel.function" in e.expected and "details.<name>" in e.expected and "device.name" in e.expected

    def test_unknown_key_lists_allowed_keys(self):
        [e] = errors_of(rule_text("    cooldwn: 5\n"))
        assert all(k in e.expected for k in RULE_KEYS)

    def test_python_tag_is_never_constructed(self, tmp_path):
        """A !!python tag is refused and never run."""
        marker = tmp_path / "pwned"
        text = f"rules: !!python/object/apply:os.system ['touch {marker}']\n"
        [e] = errors_of(text)
        assert "tag" in e.message and e.field == "rules"
        for t in (f"!!python/object/apply:os.system ['touch {marker}']\n",
                  rule_text(match=f"{{where: {{fs: !!python/object/apply:os.system ['touch {marker}']}}}}"),
                  rule_text(name="!custom r")):
            assert errors_of(t)
        assert not marker.exists()

    def test_alias_bomb_is_fast(self):
        """Aliases are walked once per node: a billion-laughs file is an error, quickly."""
        lines = ["bomb:", "  a: &a [x, x, x, x, x, x, x, x, x, x]"]
        prev = "a"
        for n in "bcdefghij":
            lines.append(f"  {n}: &{n} [" + ", ".join([f"*{prev}"] * 10) + "]")
            prev = n
        start = time.monotonic()
        errs = errors_of("\n".join(lines) + "\n")
        assert time.monotonic() - start < 5
        assert [e.field for e in errs] == ["bomb"]

    def test_deep_nesting_is_an_error(self):
        [e] = errors_of("[" * 3000)
        assert "nested too deeply" in str(e) and e.line is None

    def test_error_message_format(self):
        """FILE:LINE:COLUMN: message (field 'x.y'); expected ..."""
        [e] = errors_of(rule_text("    threshold: {count: 3, within: 0}\n"), "rules.yaml")
        assert str(e) == ("rules.yaml:5:35: duration out of range: 0 seconds (field 'rules[0].threshold.within'); "
                          'expected a duration (seconds as a number, or a string like "30s", "10m", "1h30m", "2d", '
                          '"500ms"), more than 0 seconds and at most 2592000 seconds (30d)')
        assert isinstance(e, FsnotifydError)
        bare = RuleError("cannot read rules file: No such file or directory", file="x.yaml",
                         expected="a readable YAML rules file")
        assert str(bare) == ("x.yaml: cannot read rules file: No such file or directory; "
                             "expected a readable YAML rules file")


# ------------------------------------------------------------------------------------------------
# all errors at once, several files


class TestAllErrors:
    def test_every_error_in_a_file_is_reported(self):
        """Mistakes in lists, fragments and several rules all come back together, in file order."""
        text = """\
lists:
  empty: []
fragments:
  f: {kind: fs.nope}
rules:
  - name: one
    match: {kind: fs.error, where: {count: {gt: x}}}
    actions: [snapshoot]
  - name: two
    match: {kind: fs.error}
    actions: [isolate]
    cooldown: -1
  - name: one
    match: {kind: fs.error}
    actions: [isolate]
    threshold: {count: 0, within: 1m, per: host}
"""
        errs = errors_of(text)
        got = [(e.line, e.field) for e in errs]
        assert got == [
            (2, "lists.empty"),
            (4, "fragments.f.kind"),
            (7, "rules[0].match.where.count.gt"),
            (8, "rules[0].actions[0]"),
            (12, "rules[1].cooldown"),
            (13, "rules[2].name"),
            (16, "rules[2].threshold.count"),
            (16, "rules[2].threshold.per"),
        ]
        with pytest.raises(RuleErrors) as ei:
            parse_rules(text, "f.yaml")
        assert str(ei.value).splitlines() == [str(e) for e in errs]
        assert check_text(text, "f.yaml") == errs or [str(e) for e in check_text(text, "f.yaml")] == list(
            map(str, errs))

    def test_multi_file_merge(self, tmp_path):
        """Lists and fragments from one file are used by rules in another; rules keep file order."""
        a = tmp_path / "a.yaml"
        b = tmp_path / "b.yaml"
        a.write_text("lists:\n  fns: [ext4_lookup]\nfragments:\n  corrupt: {kind: fs.error}\n"
                     "rules:\n  - name: a1\n    match: {use: corrupt}\n    actions: [isolate]\n")
        b.write_text("rules:\n  - name: b1\n    match: {use: corrupt, where: {kernel.function: {in_list: fns}}}\n"
                     "    actions: [snapshot]\n")
        rs = load_rules([str(b), str(a)])
        assert [r.name for r in rs.rules] == ["b1", "a1"]
        assert rs.files == (str(b), str(a))
        assert rs.rules[0].match.kinds == ("fs.error",)
        assert rs.rules[0].match.conditions[0] == Condition("kernel.function", "in", ("ext4_lookup",),
                                                            Origin(str(b), 3, 53))
        assert rs.lists == {"fns": ("ext4_lookup",)}
        assert check_paths([str(a), str(b)]) == []

    def test_cross_file_duplicates(self, tmp_path):
        """The same rule, list or fragment name in two files is an error in the second, naming the first."""
        a = tmp_path / "a.yaml"
        b = tmp_path / "b.yaml"
        a.write_text("lists:\n  l: [x]\nfragments:\n  f: {kind: fs.error}\n"
                     "rules:\n  - name: r\n    match: {}\n    actions: [isolate]\n")
        b.write_text("lists:\n  l: [y]\nfragments:\n  f: {kind: fs.error}\n"
                     "rules:\n  - name: r\n    match: {}\n    actions: [isolate]\n")
        with pytest.raises(RuleErrors) as ei:
            load_rules([str(a), str(b)])
        errs = ei.value.errors
        assert [(e.file, e.line, e.column, e.field) for e in errs] == [
            (str(b), 2, 3, "lists.l"), (str(b), 4, 3, "fragments.f"), (str(b), 6, 11, "rules[0].name")]
        assert all("duplicate" in e.message and f"{a}:" in e.message for e in errs)

    def test_unreadable_files_and_errors_elsewhere_all_reported(self, tmp_path):
        """A missing file, a non-UTF-8 file and a broken file are all reported in one go."""
        missing = tmp_path / "missing.yaml"
        binary = tmp_path / "bin.yaml"
        binary.write_bytes(b"rules:\n  - name: \xff\n")
        broken = tmp_path / "broken.yaml"
        broken.write_text(rule_text("    cooldown: x\n"))
        errs = check_paths([str(missing), str(binary), str(broken)])
        assert [(e.file, e.line) for e in errs] == [(str(missing), None), (str(binary), 2), (str(broken), 5)]
        assert "cannot read" in str(errs[0]) and errs[0].column is None
        assert str(errs[0]).startswith(f"{missing}: ")
        assert "UTF-8" in str(errs[1])
        with pytest.raises(RuleErrors) as ei:
            load_rules([str(missing), str(binary), str(broken)])
        assert len(str(ei.value).splitlines()) == 3

    def test_directory_is_unreadable(self, tmp_path):
        [e] = check_paths([str(tmp_path)])
        assert e.file == str(tmp_path) and e.line is None

    def test_a_lone_path_string_is_one_file(self, tmp_path):
        p = tmp_path / "r.yaml"
        p.write_text(rule_text())
        assert [r.name for r in load_rules(str(p)).rules] == ["r"]

    def test_no_files_no_rules(self):
        assert load_rules([]).rules == ()


# ------------------------------------------------------------------------------------------------
# fuzz: only RuleErrors, never another exception

_NAMES = sorted(ACTIONS)
_PARAMS = sorted({p for spec in ACTIONS.values() for p in spec})
_KEYS = st.sampled_from(sorted(set(TOP_KEYS) | set(RULE_KEYS) | set(MATCH_KEYS) | set(THRESHOLD_KEYS) | OPERATORS
                               | set(_NAMES) | set(_PARAMS) | {"ids", "labels", "tier", "<<"} | set(EVENT_FIELDS)))
_SCALARS = (st.none() | st.booleans() | st.integers(-3, 10**20) | st.floats(allow_nan=True, allow_infinity=True)
            | st.text(max_size=8)
            | st.sampled_from(sorted(RULE_KINDS) + ["fs.*", "zz.*", "*", "30s", "1h30m", "-1m", "500ms", "ve", "device",
                                                    "check", "repair", "(", "a.*", "101", "../x", "l", "f", "r"]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=4),
                       max_leaves=10)
_COND = _SCALARS | st.dictionaries(st.sampled_from(sorted(OPERATORS)), _VALUES, max_size=3)
_WHERE = st.dictionaries(st.sampled_from(list(EVENT_FIELDS) + ["details.x", "nope", "details."]), _COND, max_size=3)
_MATCH = st.fixed_dictionaries({}, optional={
    "kind": _VALUES, "use": st.sampled_from(["f", "g", ["f", "g"]]) | _VALUES, "where": _WHERE | _VALUES,
    "ve": _VALUES})
_ACTION = (st.sampled_from(_NAMES) | st.dictionaries(st.sampled_from(_NAMES), st.none()
                                                     | st.dictionaries(st.sampled_from(_PARAMS), _VALUES, max_size=3),
                                                     min_size=1, max_size=2))
_RULE = st.fixed_dictionaries({}, optional={
    "name": st.sampled_from(["r", "s", "Bad"]) | _SCALARS, "match": _MATCH | _VALUES,
    "actions": st.lists(_ACTION, max_size=3) | _VALUES, "threshold": st.dictionaries(
        st.sampled_from(list(THRESHOLD_KEYS)), _SCALARS, max_size=3) | _VALUES,
    "cooldown": _SCALARS, "enabled": _SCALARS, "dry_run": _SCALARS, "continue": _SCALARS, "reset_on": _VALUES,
    "description": _SCALARS})
# Rules built from valid pieces (so the fuzz also reaches the success path and the compiler).
_GOOD_COND = st.sampled_from([
    "x", 3, None, {"in": ["EIO", "EUCLEAN"]}, {"regex": "ext4_.*"}, {"ge": 1}, {"exists": True}, {"prefix": "loop"},
    {"in_list": "l"}, {"ne": 2.5}])
_GOOD_MATCH = st.fixed_dictionaries({}, optional={
    "kind": st.sampled_from(sorted(RULE_KINDS) + ["fs.*", "dev.*"]) | st.lists(st.sampled_from(sorted(RULE_KINDS)),
                                                                             min_size=1, max_size=3),
    "use": st.just("f"),
    "where": st.dictionaries(st.sampled_from(["kernel.function", "count", "device.name", "details.reason"]),
                             _GOOD_COND, max_size=3),
    "ve": st.sampled_from(["101", ["101", "102"], {"labels": {"tier": "gold"}}])})
_GOOD_RULE = st.fixed_dictionaries({
    "name": st.sampled_from(["a", "b", "c-1", "d.e"]), "match": _GOOD_MATCH,
    "actions": st.lists(st.sampled_from(["isolate", "snapshot", {"fsck": {"mode": "check"}},
                                         {"exec": {"command": ["/bin/true"]}}]), min_size=1, max_size=3)},
    optional={"threshold": st.fixed_dictionaries({"count": st.integers(0, 5),
                                                  "within": st.sampled_from([0, 1, "10m", "31d", 2.5])}),
              "cooldown": st.sampled_from([0, "30m", -1, "1h30m"]), "enabled": st.booleans(),
              "continue": st.booleans(), "reset_on": st.sampled_from(["fs.writable", ["dev.remove"]])})
_DOC = st.fixed_dictionaries({}, optional={
    "lists": st.just({"l": ["ext4_lookup"]}), "fragments": st.just({"f": {"where": {"fs": "ext4"}}}),
    "rules": st.lists(_GOOD_RULE, max_size=3)}) | st.fixed_dictionaries({}, optional={
    "version": _SCALARS, "lists": st.dictionaries(st.sampled_from(["l", "m", "bad name"]), _VALUES, max_size=2),
    "fragments": st.dictionaries(st.sampled_from(["f", "g"]), _MATCH | _VALUES, max_size=2),
    "rules": st.lists(_RULE, max_size=3) | _VALUES}) | _VALUES


def _only_rule_errors(text: str) -> None:
    try:
        rs = parse_rules(text, "fuzz.yaml")
    except RuleErrors as e:
        assert e.errors
        for err in e.errors:
            assert isinstance(err, RuleError) and err.file == "fuzz.yaml"
            assert err.expected and str(err).startswith("fuzz.yaml")
            if err.line is not None:
                assert err.line >= 1 and err.column is not None and err.column >= 1
    else:
        compile_rules(rs)  # whatever loads also compiles


class TestFuzz:
    @settings(max_examples=400, deadline=None)
    @given(st.text(max_size=300))
    def test_any_text(self, text):
        """Whatever the text, the loader returns a RuleSet or raises RuleErrors, nothing else."""
        _only_rule_errors(text)

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_DOC)
    def test_structured_nonsense(self, doc):
        """Known keys with random shapes and values: RuleErrors with line and column, never a crash."""
        _only_rule_errors(yaml.safe_dump(doc, allow_unicode=True))

    @settings(max_examples=400, deadline=None)
    @given(st.integers(0, len(FULL)), st.integers(0, 20), st.text(max_size=5))
    def test_mutated_valid_file(self, at, cut, insert):
        """The full example with a slice replaced by random text still only loads or raises RuleErrors."""
        _only_rule_errors(FULL[:at] + insert + FULL[at + cut:])


# ------------------------------------------------------------------------------------------------
# rules/schema.json


class TestJsonSchema:
    def schema(self) -> dict:
        return json.loads(SCHEMA_JSON.read_text())

    def test_is_json_with_expected_properties(self):
        s = self.schema()
        assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert set(s["properties"]) == set(TOP_KEYS)
        assert s["additionalProperties"] is False

    def test_consistent_with_loader(self):
        """Kinds, fields, keys, operators and actions in the schema are the loader's."""
        d = self.schema()["$defs"]
        assert set(d["kind"]["anyOf"][0]["enum"]) == set(RULE_KINDS)
        assert tuple(d["field"]["anyOf"][0]["enum"]) == EVENT_FIELDS
        assert set(d["rule"]["properties"]) == set(RULE_KEYS)
        assert set(d["rule"]["required"]) == {"name", "match", "actions"}
        assert set(d["match"]["properties"]) == set(MATCH_KEYS)
        assert set(d["threshold"]["properties"]) == set(THRESHOLD_KEYS)
        assert set(d["operators"]["properties"]) == OPERATORS
        actions = {next(iter(a["properties"])): a["properties"] for a in d["action"]["anyOf"][1:]}
        assert set(actions) == set(ACTIONS)
        for name, props in actions.items():
            assert set(props[name]["properties"]) == set(ACTIONS[name])
            assert set(props[name].get("required", ())) == {p for p, s in ACTIONS[name].items() if s[2]}

    def test_patterns_agree_with_loader(self):
        """Every pattern in the schema is a valid regex; the duration pattern accepts what the loader does."""
        import re

        s = self.schema()
        patterns: list[str] = []

        def walk(x):
            if isinstance(x, dict):
                for k, v in x.items():
                    if k == "pattern" and isinstance(v, str):
                        patterns.append(v)
                    else:
                        walk(v)
            elif isinstance(x, list):
                for v in x:
                    walk(v)

        walk(s)
        assert patterns and all(re.compile(p) for p in patterns)
        dur = re.compile(s["$defs"]["duration"]["anyOf"][1]["pattern"])
        for text in ["30s", "10m", "1h", "2d", "1h30m", "500ms", "1.5h", "1d2h3m4s5ms", "", "1 h", "30m1h", "1w",
                     "ms", "-1m", "10"]:
            assert bool(dur.search(text)) == (parse_duration(text) is not None), text
        kind = re.compile(s["$defs"]["kind"]["anyOf"][1]["pattern"])
        assert kind.search("fs.*") and kind.search("rule.*") and not kind.search("fs*") and not kind.search("*")

    def test_schema_validates_the_valid_examples(self):
        import jsonschema  # pinned in requirements.lock: the schema is checked, not skipped
        schema = self.schema()
        jsonschema.Draft202012Validator.check_schema(schema)
        validator = jsonschema.Draft202012Validator(schema)
        assert not list(validator.iter_errors(yaml.safe_load(FULL)))
        bad = yaml.safe_load(rule_text("    threshold: {count: 0, within: 1m}\n"))
        assert list(validator.iter_errors(bad))

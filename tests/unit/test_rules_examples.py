"""Every shipped example replays to its expected decisions; the default rules load."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml

from fsnotifyd.app import rulestest
from fsnotifyd.rules.loader import load_rules

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (ROOT / "rules" / "examples").iterdir() if (p / "example.yaml").exists())


def run_example(path: Path, expect: bool = True) -> tuple[int, str, str]:
    spec = yaml.safe_load((path / "example.yaml").read_text())
    out, err = io.StringIO(), io.StringIO()
    rc = rulestest.run([str(path / "rules.yaml")], [str(path / e) for e in spec["events"]],
                       expect=str(path / "expected.jsonl") if expect else None, fmt="json",
                       ve_map=str(path / spec["ve_map"]) if spec.get("ve_map") else None,
                       year=spec.get("year"), out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


class TestExamples:
    @pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
    def test_example_decides_as_expected(self, path):
        """The example's incident gives exactly its expected decisions, and something fires."""
        rc, out, err = run_example(path)
        assert rc == 0, err
        assert any(json.loads(line)["outcome"] == "fired" for line in out.splitlines())

    @pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
    def test_replay_twice_is_identical(self, path):
        """Replaying the same log twice gives identical decisions (event ids included)."""
        assert run_example(path, expect=False)[1] == run_example(path, expect=False)[1]

    def test_a_changed_decision_fails_with_a_diff(self, tmp_path):
        """--expect exits 1 and shows a unified diff when a decision differs."""
        path = ROOT / "rules" / "examples" / "storm"
        lines = (path / "expected.jsonl").read_text().splitlines()
        first = json.loads(lines[0])
        first["outcome"] = "fired"
        wrong = tmp_path / "expected.jsonl"
        wrong.write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
        out, err = io.StringIO(), io.StringIO()
        rc = rulestest.run([str(path / "rules.yaml")], [str(path / "incident.jsonl")], expect=str(wrong),
                           out=out, err=err)
        assert rc == 1
        assert "decisions differ" in err.getvalue() and '+{"actions"' in err.getvalue()
        assert '-{"actions"' in err.getvalue()

    def test_default_rules_load(self):
        """The embedded default rules are valid and non-empty."""
        ruleset = load_rules([str(ROOT / "rules" / "default.yaml")])
        assert len(ruleset.rules) >= 8 and all(r.description for r in ruleset.rules)

"""The alerting assets in packaging/: the Prometheus rules and their promtool unit tests, and
the Grafana dashboard, held to promtool and to the metrics the daemon really exports.

promtool comes from Debian's prometheus package, unpacked by scripts/bootstrap.sh into
.cache/prometheus and linked as .venv/bin/promtool; without it the promtool tests skip (fail
under FSNOTIFYD_REQUIRE_KERNEL=1, as in CI). The PromQL checks below are regular expressions,
not a parser: they find every ``fsnotifyd_*`` name and the labels in its matchers, in
``by``/``without`` of the aggregation around it and in ``on``/``ignoring``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from fsnotifyd.metrics import Metrics
from fsnotifyd.statefile import FileState

ROOT = Path(__file__).resolve().parents[2]
PROMTOOL = ROOT / ".venv" / "bin" / "promtool"
ALERTS = ROOT / "packaging" / "prometheus" / "alerts.yaml"
ALERTS_TEST = ROOT / "packaging" / "prometheus" / "alerts_test.yaml"
DASHBOARD = ROOT / "packaging" / "grafana" / "fsnotifyd-dashboard.json"
RUNBOOKS = "https://github.com/fsnotifyd/fsnotifyd/blob/main/"

TARGET_LABELS = {"instance", "job"}  # added by the scrape, on every series
AGGREGATIONS = "sum|min|max|avg|group|count|stddev|stdvar|topk|bottomk|quantile|count_values"
METRIC = re.compile(r"\bfsnotifyd_[a-zA-Z0-9_]+\b")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


# -- promtool --------------------------------------------------------------------------------------
def promtool() -> str:
    if os.access(PROMTOOL, os.X_OK):
        return str(PROMTOOL)
    reason = (f"promtool not found at {PROMTOOL.relative_to(ROOT)}: run scripts/bootstrap.sh (it unpacks "
              "Debian's prometheus package into .cache/prometheus and links the binary)")
    if os.environ.get("FSNOTIFYD_REQUIRE_KERNEL") == "1":
        pytest.fail(f"FSNOTIFYD_REQUIRE_KERNEL=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def run_promtool(*args: str) -> str:
    proc = subprocess.run([promtool(), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{out}"
    return out


def alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_promtool_check_rules() -> None:
    out = run_promtool("check", "rules", str(ALERTS.relative_to(ROOT)))
    m = re.search(r"SUCCESS: (\d+) rules found", out)
    assert m, out
    assert int(m.group(1)) == len(alert_rules()) > 0


def test_promtool_unit_tests() -> None:
    out = run_promtool("test", "rules", str(ALERTS_TEST.relative_to(ROOT)))
    assert re.search(r"^\s*SUCCESS\s*$", out, re.M), out
    assert "FAILED" not in out, out


def test_dashboard_expressions_parse(tmp_path: Path) -> None:
    """Every dashboard query is valid PromQL: checked as recording rules, Grafana's variables
    replaced by values of the right kind."""
    def concrete(expr: str) -> str:
        expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
        return re.sub(r"\$\{?\w+\}?", ".*", expr)
    rules = [{"record": f"dashboard_query_{i}", "expr": concrete(e)} for i, (_, e) in enumerate(dashboard_exprs())]
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = run_promtool("check", "rules", str(path))
    assert f"SUCCESS: {len(rules)} rules found" in out, out


# -- the rule file's shape ---------------------------------------------------------------------
def test_alerts_are_complete() -> None:
    rules = alert_rules()
    assert all("alert" in r for r in rules), "recording rules: give them a reason and a test first"
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), names
    for r in rules:
        where = r["alert"]
        assert re.fullmatch(r"\d+[smh]", str(r.get("for", ""))), f"{where}: no for:"
        assert r.get("labels", {}).get("severity") in ("critical", "warning", "info"), where
        ann = r.get("annotations", {})
        assert {"summary", "description", "runbook_url"} <= set(ann), where
        url = ann["runbook_url"]
        assert url.startswith(RUNBOOKS) and "#" in url, f"{where}: {url}"
        assert (ROOT / url[len(RUNBOOKS):].split("#")[0]).is_file(), f"{where}: {url} is no file in the repository"


def test_every_alert_is_shown_firing() -> None:
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    fired = {c["alertname"] for t in tests for c in t.get("alert_rule_test", []) if c.get("exp_alerts")}
    quiet = {c["alertname"] for t in tests for c in t.get("alert_rule_test", []) if not c.get("exp_alerts")}
    names = {r["alert"] for r in alert_rules()}
    assert names - fired == set(), "alerts never shown firing in alerts_test.yaml"
    assert len(quiet & names) >= len(names) // 2, "show the alerts not firing too"


# -- metric names and labels against the daemon's registry -------------------------------------
def exported() -> dict[str, set[str]]:
    """Exposed sample name -> its label names, from the registry the daemon serves."""
    m = Metrics()
    m.bind_isolated(lambda: ["x"])
    m.bind_correlator(lambda: {})
    m.bind_images(lambda: [("x", "x", {"ok": True, "healthy": True, "stats": {}, "errors": 0,
                                        "fast_path": {"fallbacks": 0}})])
    m.bind_files(lambda: [FileState("x")])
    m.fs_gauges.set("x", "x", "regions_live", 1)
    m.fs_gauges.set("x", "x", "swelling", 1.0)
    for field in ("garbage", "fragmentation", "image_swelling", "df_ratio"):
        m.fs_gauges.set("x", "x", field, 1.0)
    # A labelled metric shows no sample (and so no label names) before its first child exists.
    for w in vars(m).values():
        if isinstance(w, MetricWrapperBase) and getattr(w, "_labelnames", ()):
            w.labels(*["x"] * len(w._labelnames))
    names: dict[str, set[str]] = {}
    for family in m.registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        for suffix in suffixes:  # a family without samples still has these names
            names.setdefault(family.name + suffix, set())
        for s in family.samples:
            names.setdefault(s.name, set()).update(s.labels)
    return names


def balanced(text: str, open_at: int) -> str:
    """The text inside the parenthesis that opens at ``open_at``."""
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[open_at + 1:i]
    raise AssertionError(f"unbalanced parentheses: {text!r}")


def label_list(text: str) -> set[str]:
    return {x.strip() for x in text.split(",") if x.strip()}


def problems(expr: str, names: dict[str, set[str]]) -> list[str]:
    found: list[str] = []
    bare = STRING.sub('""', expr)
    used = set(METRIC.findall(bare))
    found += [f"{n} is not exported by fsnotifyd" for n in sorted(used - set(names))]
    # matchers: name{label op "value", ...}
    for m in re.finditer(r"\b(fsnotifyd_[a-zA-Z0-9_]+)\s*\{([^}]*)\}", expr):
        for label in re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", STRING.sub('""', m.group(2))):
            if label not in names.get(m.group(1), set()) | TARGET_LABELS:
                found.append(f"{m.group(1)} has no label {label!r}")
    # aggregations, prefix form: op by (labels) (argument)
    prefix = list(re.finditer(rf"\b(?:{AGGREGATIONS})\s*(by|without)\s*\(([^)]*)\)\s*(?=\()", bare))
    if len(prefix) != len(re.findall(r"\b(?:by|without)\s*\(", bare)):
        found.append("write by/without before the aggregation's argument (sum by (x) (...)) so it can be checked")
    for m in prefix:
        inner = set(METRIC.findall(balanced(bare, m.end())))
        for label in label_list(m.group(2)):
            for n in sorted(inner & set(names)):
                if label not in names[n] | TARGET_LABELS:
                    found.append(f"{m.group(1)} ({label}) over {n}, which has no label {label!r}")
    # vector matching: on (labels) / ignoring (labels): some metric of the expression has them
    everything = set().union(*(names.get(n, set()) for n in used)) | TARGET_LABELS
    for m in re.finditer(r"\b(?:on|ignoring|group_left|group_right)\s*\(([^)]*)\)", bare):
        found += [f"no metric here has the label {label!r} of {m.group(0)}"
                  for label in label_list(m.group(1)) - everything]
    return found


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict]) -> list[dict]:
    out = []
    for p in panels:
        out.append(p)
        out += all_panels(p.get("panels", []))
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    d = dashboard()
    exprs = [(f"panel {p.get('title')!r}", t["expr"])
             for p in all_panels(d["panels"]) for t in p.get("targets", []) if t.get("expr")]
    for v in d.get("templating", {}).get("list", []):
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", q or "")
        if m:  # label_values(selector, label): the label must be the selector's
            exprs.append((f"variable {v['name']!r}", f"sum by ({m.group(2)}) ({m.group(1)})"))
    return exprs


def test_selftest_the_checker() -> None:
    names = {"fsnotifyd_a_total": {"ve"}, "fsnotifyd_b": {"sink"}}
    assert problems('sum by (instance, ve) (rate(fsnotifyd_a_total{ve=~"$ve", job="x"}[5m]))', names) == []
    assert problems("fsnotifyd_c_total", names) == ["fsnotifyd_c_total is not exported by fsnotifyd"]
    assert problems('fsnotifyd_b{ve="x"}', names) == ["fsnotifyd_b has no label 've'"]
    assert len(problems("sum by (ve) (fsnotifyd_b)", names)) == 1
    assert len(problems("sum(fsnotifyd_b) by (sink)", names)) == 1
    assert len(problems("fsnotifyd_b and on (ve) fsnotifyd_b", names)) == 1
    assert problems("fsnotifyd_a_total and on (ve) fsnotifyd_b", names) == []


def test_alert_metrics_exist() -> None:
    names = exported()
    found = [f"{r['alert']}: {p}" for r in alert_rules() for p in problems(r["expr"], names)]
    assert found == []
    assert all(METRIC.search(r["expr"]) or "up{" in r["expr"] for r in alert_rules())


def test_dashboard_metrics_exist() -> None:
    names = exported()
    exprs = dashboard_exprs()
    found = [f"{where}: {p}" for where, e in exprs for p in problems(e, names)]
    assert found == []
    used = {n for _, e in exprs for n in METRIC.findall(e)}
    wanted = {
        "fsnotifyd_events_total", "fsnotifyd_source_events_total", "fsnotifyd_kernel_errors_total",
        "fsnotifyd_source_up",
        "fsnotifyd_events_lost_total", "fsnotifyd_actions_total", "fsnotifyd_fsck_results_total",
        "fsnotifyd_ve_isolated", "fsnotifyd_fs_swelling_ratio", "fsnotifyd_space_failures_total",
        "fsnotifyd_event_latency_seconds_bucket", "fsnotifyd_webhook_spool_events",
        "fsnotifyd_webhook_oldest_spooled_seconds",
    }
    assert wanted - used == set(), "panels missing"


# -- the dashboard's shape ---------------------------------------------------------------------
def test_dashboard_structure() -> None:
    d = dashboard()
    assert d["schemaVersion"] >= 36 and d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ve = variables["ve"]["query"]
    assert re.match(r"label_values\(fsnotifyd_events_total\b.*,\s*ve\)$", ve["query"] if isinstance(ve, dict) else ve)

    panels = all_panels(d["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    taken: dict[tuple[int, int], str] = {}
    for p in panels:
        title = p.get("title")
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, title
        for cell in ((x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])):
            assert cell not in taken, f"panels {taken[cell]!r} and {title!r} overlap"
            taken[cell] = title
        if p["type"] == "row":
            continue
        assert p.get("datasource", {}).get("uid") == "${DS_PROMETHEUS}", f"{title}: datasource"
        assert p.get("targets"), f"{title}: no targets"
        refs = [t.get("refId") for t in p["targets"]]
        assert len(refs) == len(set(refs)) and all(refs), f"{title}: refIds"
        for t in p["targets"]:
            assert t.get("expr", "").strip(), f"{title}: empty query"
            assert t.get("datasource", p["datasource"])["uid"] == "${DS_PROMETHEUS}", f"{title}: target datasource"

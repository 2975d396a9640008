"""Config loading: defaults, and errors that name file, line and field."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fsnotifyd.config import load_config, parse_config
from fsnotifyd.errors import ConfigError


class TestDefaults:
    def test_embedded_default_loads(self):
        """The embedded default config is valid and enables every source."""
        cfg = load_config(None)
        assert set(cfg.sources) == {"kmsg", "fanotify", "sysfs", "mountinfo", "udev",
                                    "bpf_errors", "bpf_space", "bpf_alloc", "quota"}
        assert cfg.sources["bpf_alloc"].region_mib == 1
        assert cfg.sources["bpf_space"].ext4_devices is False
        assert all(s.enabled for s in cfg.sources.values())
        assert cfg.metrics_address == "127.0.0.1"


class TestSinksAndControl:
    def test_parsed(self):
        cfg = parse_config(
            "sinks:\n  webhooks:\n    - name: ops\n      url: https://h.example/x\n      kinds: [fs.*, rule.matched]\n"
            "      token_file: /etc/fsnotifyd/t\n      tls_verify: false\n      retry_max_s: 60\n"
            "  syslog: {enabled: true, target: journal, facility: local3, min_severity: warning}\n"
            "control: {group: root, max_clients: 8}\n", "c.yaml")
        (hook,) = cfg.webhooks
        assert (hook.name, hook.url, hook.kinds, hook.token_file, hook.tls_verify, hook.retry_max_s) == (
            "ops", "https://h.example/x", ("fs.*", "rule.matched"), "/etc/fsnotifyd/t", False, 60.0)
        assert (cfg.syslog.enabled, cfg.syslog.target, cfg.syslog.facility, cfg.syslog.min_severity) == (
            True, "journal", "local3", "warning")
        assert (cfg.control.group, cfg.control.max_clients, cfg.control.max_request_bytes) == ("root", 8, 65536)

    def test_defaults_send_nowhere_new(self):
        cfg = load_config(None)
        assert cfg.webhooks == () and not cfg.syslog.enabled and cfg.control.group == "root"


class TestErrors:
    @pytest.mark.parametrize(
        "text, line, field, words",
        [
            ("socket: /x\nsoket: /y\n", 2, "soket", "unknown key"),
            ("metrics:\n  port: eighty\n", 2, "metrics.port", "expected"),
            ("ves:\n  - id: 101\n    mount: /a\n  - id: ../etc\n", 4, "ves[1].id", "invalid VE id"),
            ("ves:\n  - id: a\n  - id: a\n", 3, "ves[1].id", "duplicate"),
            ("ves:\n  - mount: /a\n", 2, "ves[0].id", "missing"),
            ("sources:\n  kmsg: {enabled: maybe}\n", 2, "sources.kmsg.enabled", "boolean"),
            ("correlator:\n  window_ms: -1\n", 2, "correlator.window_ms", "at least"),
            ("a: [\n", 2, None, "not valid YAML"),
            ("sinks:\n  webhooks:\n    - name: a\n      url: ftp://x\n", 4, "sinks.webhooks[0].url", "http"),
            ("sinks:\n  webhooks:\n    - url: https://x\n", 3, "sinks.webhooks[0].name", "missing"),
            ("sinks:\n  webhooks:\n    - {name: a, url: 'https://x'}\n    - {name: a, url: 'https://y'}\n", 4,
             "sinks.webhooks[1].name", "duplicate"),
            ("sinks:\n  webhooks:\n    - name: ../x\n      url: https://x\n", 3, "sinks.webhooks[0].name",
             "spool directory"),
            ("sinks:\n  webhooks:\n    - name: a\n      url: http://example.net/\n      token_file: /t\n", 4,
             "sinks.webhooks[0].url", "in clear"),
            ("sinks:\n  webhooks:\n    - name: a\n      url: https://x\n      kinds: [fs.eror]\n", 5,
             "sinks.webhooks[0].kinds[0]", "unknown event kind"),
            ("sinks:\n  webhooks:\n    - name: a\n      url: https://x\n      spool_max_bytes: 10\n", 5,
             "sinks.webhooks[0].spool_max_bytes", "at least"),
            ("sinks:\n  syslog: {facility: local9}\n", 2, "sinks.syslog.facility", "expected one of"),
            ("sinks:\n  syslog:\n    ident: two words\n", 3, "sinks.syslog.ident", "without spaces"),
            ("sinks:\n  smtp: {}\n", 2, "sinks.smtp", "unknown key"),
            ("control:\n  group: no-such-group-here\n", 2, "control.group", "no such group"),
            ("control:\n  max_request_bytes: 10\n", 2, "control.max_request_bytes", "at least"),
            # Half a TLS block would be served as plain HTTP by prometheus-client: refused.
            ("metrics:\n  tls:\n    certfile: /c.pem\n", 3, "metrics.tls.keyfile", "needs both certfile and keyfile"),
            ("metrics:\n  tls:\n    keyfile: /k.pem\n", 3, "metrics.tls.certfile", "missing required key"),
            ("metrics:\n  tls:\n    certfile: /c\n    keyfile: /k\n    cafile: /ca\n", 5, "metrics.tls.cafile",
             "unknown key; expected one of: certfile, keyfile, client_cafile, client_capath, min_version"),
            ("metrics:\n  tls:\n    certfile: /c\n    keyfile: /k\n    min_version: 1.1\n", 5,
             "metrics.tls.min_version", "expected 1.2 or 1.3, got 1.1"),
            ("metrics:\n  tls:\n    certfile: 42\n    keyfile: /k\n", 3, "metrics.tls.certfile", "expected a string"),
            ("metrics:\n  tls:\n    certfile: ''\n    keyfile: /k\n", 3, "metrics.tls.certfile", "must be a path"),
            ("metrics:\n  tls: [a]\n", 2, "metrics.tls", "expected a mapping"),
        ],
    )
    def test_error_names_line_and_field(self, text, line, field, words):
        """Each mistake is reported with its line and dotted field path."""
        with pytest.raises(ConfigError) as ei:
            parse_config(text, "c.yaml")
        e = ei.value
        assert (e.file, e.line, e.field) == ("c.yaml", line, field)
        assert words in str(e) and str(e).startswith(f"c.yaml:{line}:")

    def test_ves_parsed(self, tmp_path):
        """VEs carry mounts, devices, images (resolved) and labels."""
        img = tmp_path / "101.img"
        img.touch()
        cfg = parse_config(f"ves:\n  - id: 101\n    mount: /vz/root/101/\n    image: {img}\n"
                           "    labels: {tier: gold}\n")
        [ve] = cfg.ves
        assert ve.id == "101" and ve.mounts == ("/vz/root/101",) and ve.images == (str(img),)
        assert ve.labels == (("tier", "gold"),)


_KEYS = st.sampled_from(["state_dir", "socket", "journal", "path", "max_bytes", "keep", "stdout", "metrics",
                         "port", "address", "sources", "kmsg", "fanotify", "enabled", "interval", "fstypes",
                         "ves", "id", "mount", "device", "image", "labels", "correlator", "window_ms"])
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=12,
)


class TestFuzz:
    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=200))
    def test_any_text_loads_or_raises_config_error(self, text):
        """Whatever the text, the loader returns a Config or raises ConfigError, nothing else."""
        try:
            parse_config(text, "fuzz.yaml")
        except ConfigError:
            pass

    @settings(max_examples=300, deadline=None)
    @given(st.dictionaries(_KEYS, _VALUES, max_size=5))
    def test_structured_nonsense_raises_only_config_error(self, doc):
        """Known keys with wrong shapes and types give ConfigError with a line, never a crash."""
        try:
            parse_config(yaml.safe_dump(doc), "fuzz.yaml")
        except ConfigError as e:
            assert e.file == "fuzz.yaml"


class TestWording:
    """Every config error names types as the rules' errors do, never with a Python repr."""

    @pytest.mark.parametrize(
        "text, line, field, message",
        [
            ("queue_size: 1.5\n", 1, "queue_size", "expected an integer, got 1.5"),
            ("queue_size: true\n", 1, "queue_size", "expected an integer, got true"),
            ("metrics:\n  port: x\n", 2, "metrics.port", "expected an integer or null, got 'x'"),
            ("stdout: maybe\n", 1, "stdout", "expected a boolean (true or false), got 'maybe'"),
            ("socket: 5\n", 1, "socket", "expected a string, got 5"),
            ("socket: null\n", 1, "socket", "expected a string, got null"),
            ("state_dir: 2024-01-01\n", 1, "state_dir",
             "expected a string, got 2024-01-01 (a date; quote it to make it a string)"),
            ("journal:\n  path: [a]\n", 2, "journal.path", "expected a string or null, got a list"),
            ("ves: x\n", 1, "ves", "expected a list of VEs, got 'x'"),
            ("rules: {a: 1}\n", 1, "rules", "expected a string or a list of strings, got a mapping"),
            ("metrics: 5\n", 1, "metrics", "expected a mapping, got 5"),
            ("correlator:\n  window_ms: fast\n", 2, "correlator.window_ms", "expected a number, got 'fast'"),
            ("ves:\n  - id: [1]\n", 2, "ves[0].id", "expected a string or an integer, got a list"),
        ],
    )
    def test_wrong_type(self, text, line, field, message):
        with pytest.raises(ConfigError) as ei:
            parse_config(text, "c.yaml")
        assert str(ei.value) == f"c.yaml:{line}: {message} (field {field!r})"

    def test_no_python_repr_in_any_error(self):
        """Every scalar, list and mapping of a full config replaced by every wrong kind of value:
        each error names file:line and field, and reads as YAML, not Python."""
        import re

        full = {
            "state_dir": "/var/lib/x", "socket": "/run/x.sock",
            "journal": {"path": "/var/lib/x/e.jsonl", "max_bytes": 65536, "keep": 2},
            "stdout": False, "metrics": {"address": "127.0.0.1", "port": 9857},
            "correlator": {"window_ms": 20, "state_window_ms": 1000, "io_window_ms": 100},
            "queue_size": 1024,
            "sources": {"fanotify": {"enabled": True, "interval": 1.0, "fstypes": ["ext4"]},
                        "bpf_alloc": {"region_mib": 1}, "bpf_space": {"ext4_devices": False}},
            "ves": [{"id": "101", "mount": "/vz/root/101", "device": "loop3", "image": "/vz/101.img",
                     "cgroup": "/sys/fs/cgroup/x", "labels": {"tier": "gold"}}],
            "rules": ["rules.yaml"],
            "actions": {"enabled": True, "dry_run": False, "concurrency": 1, "timeout_s": 600,
                        "fsck_timeout_s": 3600, "repair_window": "01:00-05:00"},
            "sinks": {"webhooks": [{"name": "ops", "url": "https://h.example/x", "kinds": ["fs.*"],
                                    "token_file": "/t", "tls_verify": True, "ca_file": "/ca", "timeout_s": 10,
                                    "retry_initial_s": 1, "retry_max_s": 300, "spool_max_bytes": 65536}],
                      "syslog": {"enabled": True, "target": "auto", "path": "/dev/log", "format": "rfc3164",
                                 "ident": "fsnotifyd", "facility": "daemon", "kinds": ["fs.*"],
                                 "min_severity": "info"}},
            "control": {"group": "root", "max_request_bytes": 65536, "max_clients": 64},
        }
        parse_config(yaml.safe_dump(full), "c.yaml")  # the template itself is valid

        def paths(node, prefix=()):
            yield prefix
            children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
            for k, v in children:
                yield from paths(v, (*prefix, k))

        def replaced(node, path, value):
            if not path:
                return value
            copy = dict(node) if isinstance(node, dict) else list(node)
            copy[path[0]] = replaced(node[path[0]], path[1:], value)
            return copy

        import datetime

        wrong = ["x", "", 1.5, 7, -1, True, None, [1], {"a": 1}, datetime.date(2024, 1, 1)]
        errors = []
        for path in list(paths(full))[1:]:
            for value in wrong:
                try:
                    parse_config(yaml.safe_dump(replaced(full, path, value)), "c.yaml")
                except ConfigError as e:
                    errors.append(str(e))
                    assert re.match(r"c\.yaml:\d+: ", str(e)) and e.field, str(e)
        assert len(errors) > 300
        python = re.compile(r"<class|NoneType|\bNone\b|\bTrue\b|\bFalse\b|\bdict\b|datetime\.")
        assert [e for e in errors if python.search(e)] == []


class TestSinkValuesCheckedOnce:
    """The facility and webhook URL checks are the sinks' own: config and sink say the same."""

    @pytest.mark.parametrize("url", ["ftp://x/", "https://", "https://h:99999/", "https://u:p@h/", "https://@h/"])
    def test_webhook_url(self, url, tmp_path):
        from fsnotifyd.config import WebhookConfig
        from fsnotifyd.sinks.webhook import WebhookSink

        with pytest.raises(ConfigError) as by_config:
            parse_config(f"sinks:\n  webhooks:\n    - name: a\n      url: '{url}'\n", "c.yaml")
        with pytest.raises(ConfigError) as by_sink:
            WebhookSink(WebhookConfig(name="a", url=url), str(tmp_path / "spool"), None)
        assert by_config.value.line == 4
        assert str(by_config.value).split(": ", 1)[1].rsplit(" (field", 1)[0] == \
            str(by_sink.value).rsplit(" (field", 1)[0]

    def test_facility(self):
        from fsnotifyd import sinkvalues
        from fsnotifyd.config import SyslogConfig
        from fsnotifyd.sinks import syslog

        assert syslog.facility_code is sinkvalues.facility_code and syslog.FACILITIES is sinkvalues.FACILITIES
        with pytest.raises(ConfigError) as by_config:
            parse_config("sinks:\n  syslog: {facility: daemons}\n", "c.yaml")
        with pytest.raises(ValueError) as by_sink:
            syslog.SyslogSink(SyslogConfig(facility="daemons"))
        assert str(by_config.value) == f"c.yaml:2: {by_sink.value} (field 'sinks.syslog.facility')"


class TestMetricsTLS:
    def test_parsed(self):
        """A TLS block with a client CA; min_version may be written as a YAML number."""
        cfg = parse_config("metrics:\n  port: 9857\n  tls:\n    certfile: /etc/t/c.pem\n    keyfile: /etc/t/k.pem\n"
                           "    client_cafile: /etc/t/ca.pem\n    min_version: 1.3\n", "c.yaml")
        tls = cfg.metrics_tls
        assert tls is not None and (tls.certfile, tls.keyfile, tls.client_cafile, tls.min_version) == (
            "/etc/t/c.pem", "/etc/t/k.pem", "/etc/t/ca.pem", "1.3")
        assert tls.client_auth
        assert load_config(None).metrics_tls is None  # plain HTTP unless asked
        assert parse_config("metrics: {tls: null}\n").metrics_tls is None

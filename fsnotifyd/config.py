"""The daemon's configuration: one YAML file, checked at load with file:line errors.

YAML is composed to nodes (not just loaded) so every error can point at the line of the field
that is wrong. Unknown keys are errors: a misspelt key silently ignored is a setting an
operator believes is in force and is not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from .errors import ConfigError
from .events import SEVERITIES, KindFilter
from .inventory import VE, validate_ve_id
from .sinkvalues import facility_code, webhook_url
from .wording import node_kind, type_phrase, yaml_value
from .yamlpos import YamlSyntaxError, compose, position, scalar_value


@dataclass(frozen=True)
class SourceConfig:
    enabled: bool = True
    interval: float | None = None
    fstypes: tuple[str, ...] = ()
    region_mib: int | None = None  # bpf_alloc: the image cluster size regions are counted in
    figures_interval: float | None = None  # bpf_alloc: seconds between thinness measurements per fs (0: off)
    ext4_devices: bool | None = None  # bpf_space: also hook ext4's block mapping to name devices


@dataclass(frozen=True)
class WebhookConfig:
    """One HTTP endpoint that receives events as CloudEvents 1.0 (structured JSON mode)."""

    name: str
    url: str
    kinds: tuple[str, ...] = ()  # empty: every kind; "fs.*" matches a prefix
    token_file: str | None = None  # bearer token, read at start (kept out of the config file)
    tls_verify: bool = True
    ca_file: str | None = None  # CA bundle for a private CA; default: the system's
    timeout_s: float = 10.0  # per POST
    retry_initial_s: float = 1.0  # first backoff; doubles (with jitter) up to retry_max_s
    retry_max_s: float = 300.0
    spool_max_bytes: int = 64 << 20  # past this, the oldest undelivered events are dropped and counted


@dataclass(frozen=True)
class SyslogConfig:
    """Events to the system log: journald's native protocol (structured fields) or RFC 5424."""

    enabled: bool = False
    target: str = "auto"  # auto: journald if its socket exists, else syslog; or "journal" / "syslog"
    path: str | None = None  # the socket; default /run/systemd/journal/socket or /dev/log
    format: str = "rfc3164"  # syslog only: "rfc3164" (key=value in the text; every syslogd reads it) or "rfc5424"
    ident: str = "fsnotifyd"
    facility: str = "daemon"
    kinds: tuple[str, ...] = ()  # empty: every kind
    min_severity: str = "info"


@dataclass(frozen=True)
class MetricsTLSConfig:
    """HTTPS for the metrics endpoint; with a client CA, scrapes must present a certificate it signed."""

    certfile: str
    keyfile: str
    client_cafile: str | None = None
    client_capath: str | None = None
    min_version: str = "1.2"  # "1.2" or "1.3"

    @property
    def client_auth(self) -> bool:
        return self.client_cafile is not None or self.client_capath is not None


@dataclass(frozen=True)
class ControlConfig:
    """Who may use the control socket and how much they may send."""

    group: str = "root"  # the socket is root:<group> 0660; members may use it (status, tail, reload, release)
    max_request_bytes: int = 64 * 1024
    max_clients: int = 64


@dataclass(frozen=True)
class Config:
    state_dir: str = "/var/lib/fsnotifyd"
    socket: str = "/run/fsnotifyd/fsnotifyd.sock"
    journal_path: str | None = "/var/lib/fsnotifyd/events.jsonl"
    journal_max_bytes: int = 64 << 20
    journal_keep: int = 5
    stdout: bool = False
    metrics_address: str = "127.0.0.1"
    metrics_port: int | None = 9857
    metrics_tls: MetricsTLSConfig | None = None  # None: plain HTTP
    window_ms: float = 20
    state_window_ms: float = 1000
    io_window_ms: float = 100
    queue_size: int = 65536
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    ves: tuple[VE, ...] = ()
    rules: tuple[str, ...] | None = None  # None: the embedded default rules
    actions: ActionsConfig = field(default_factory=lambda: ActionsConfig())
    webhooks: tuple[WebhookConfig, ...] = ()
    syslog: SyslogConfig = field(default_factory=lambda: SyslogConfig())
    control: ControlConfig = field(default_factory=lambda: ControlConfig())
    file: str = "<default>"


@dataclass(frozen=True)
class ActionsConfig:
    enabled: bool = True  # False: decisions are published, nothing is carried out
    dry_run: bool = False  # every job only records what it would do
    concurrency: int = 1  # heavy jobs (fsck, shrink) at once, host-wide
    timeout_s: float = 600.0  # per job
    fsck_timeout_s: float = 3600.0
    repair_window: str | None = None  # "HH:MM-HH:MM" local time: fsck repairs wait for it



def parse_window(text: str) -> tuple[int, int]:
    """``"HH:MM-HH:MM"`` (local time; may wrap past midnight) as minutes after midnight."""
    try:
        a, b = text.split("-")
        start, end = (int(x.split(":")[0]) * 60 + int(x.split(":")[1]) for x in (a, b))
    except (ValueError, IndexError):
        raise ValueError(f"not a window HH:MM-HH:MM: {text!r}") from None
    if not (0 <= start < 1440 and 0 <= end < 1440) or start == end:
        raise ValueError(f"not a window HH:MM-HH:MM: {text!r}")
    return start, end



# The config key of every source under ``sources:``: the one list of source names; the
# factories of sources/registry.py are keyed by these names (checked when it is imported).
SOURCES = ("kmsg", "fanotify", "sysfs", "mountinfo", "udev", "bpf_errors", "bpf_space", "bpf_alloc", "quota")


class _Reader:
    def __init__(self, file: str) -> None:
        self.file = file

    def error(self, node: yaml.Node | None, msg: str, fieldname: str | None = None) -> ConfigError:
        line = position(node)[0] if node is not None else None
        return ConfigError(msg, file=self.file, line=line, field=fieldname)

    def what(self, node: yaml.Node) -> str:
        """What a node is, for "got ...": a list, a mapping, or the scalar as written in YAML."""
        if not isinstance(node, yaml.ScalarNode):
            return node_kind(node)
        try:
            return yaml_value(scalar_value(node))
        except Exception:  # noqa: BLE001 - shown as written, the caller's error says what is wrong
            return yaml_value(node.value)

    def mapping(self, node: yaml.Node, path: str, allowed: tuple[str, ...]) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, f"expected a mapping, got {self.what(node)}", path or None)
        out: dict[str, yaml.Node] = {}
        for knode, vnode in node.value:
            key = knode.value if isinstance(knode, yaml.ScalarNode) else None
            name = f"{path}.{key}" if path else str(key)
            if key not in allowed:
                raise self.error(knode, f"unknown key; expected one of: {', '.join(allowed)}", name)
            if key in out:
                raise self.error(knode, "duplicate key", name)
            out[key] = vnode
        return out

    def scalar(self, node: yaml.Node, name: str, kind: type | tuple[type, ...]) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(node, f"expected {type_phrase(kind)}, got {self.what(node)}", name)
        try:
            value = scalar_value(node)
        except Exception as e:  # noqa: BLE001 - a constructor raises ValueError, OverflowError, ...
            raise self.error(node, f"cannot read value: {e}", name) from None
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python, not in YAML: `port: true` is a mistake, not port 1.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise self.error(node, f"expected {type_phrase(kind)}, got {yaml_value(value)}", name)
        return value

    def number(self, node: yaml.Node, name: str, *, minimum: float = 0, integer: bool = False) -> Any:
        value = self.scalar(node, name, int if integer else (int, float))
        if value < minimum:
            raise self.error(node, f"must be at least {minimum}, got {value}", name)
        return value

    def strings(self, node: yaml.Node, name: str) -> tuple[str, ...]:
        if isinstance(node, yaml.ScalarNode):
            return (self.scalar(node, name, str),)
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(node, f"expected a string or a list of strings, got {self.what(node)}", name)
        return tuple(self.scalar(n, f"{name}[{i}]", str) for i, n in enumerate(node.value))


def parse_config(text: str, file: str = "<string>") -> Config:
    r = _Reader(file)
    try:
        root = compose(text)
    except YamlSyntaxError as e:
        if e.why == "syntax":
            raise ConfigError(f"not valid YAML: {e.problem}", file=file, line=e.line) from e
        # a forbidden character, a document nested too deeply: PyYAML's words, and the line if known
        raise ConfigError(f"not valid YAML: {e.text}", file=file, line=e.line) from e
    if root is None:
        return Config(file=file, sources={s: SourceConfig() for s in SOURCES})
    top = r.mapping(root, "", ("state_dir", "socket", "journal", "stdout", "metrics", "correlator",
                               "queue_size", "sources", "ves", "rules", "actions", "sinks", "control"))
    kw: dict[str, Any] = {"file": file}
    if "state_dir" in top:
        kw["state_dir"] = r.scalar(top["state_dir"], "state_dir", str)
    if "socket" in top:
        kw["socket"] = r.scalar(top["socket"], "socket", str)
    if "stdout" in top:
        kw["stdout"] = r.scalar(top["stdout"], "stdout", bool)
    if "queue_size" in top:
        kw["queue_size"] = r.number(top["queue_size"], "queue_size", minimum=16, integer=True)
    if "journal" in top:
        if isinstance(top["journal"], yaml.ScalarNode) and top["journal"].value in ("null", "~", ""):
            kw["journal_path"] = None
        else:
            j = r.mapping(top["journal"], "journal", ("path", "max_bytes", "keep"))
            if "path" in j:
                kw["journal_path"] = r.scalar(j["path"], "journal.path", (str, type(None)))
            if "max_bytes" in j:
                kw["journal_max_bytes"] = r.number(j["max_bytes"], "journal.max_bytes", minimum=4096, integer=True)
            if "keep" in j:
                kw["journal_keep"] = r.number(j["keep"], "journal.keep", minimum=1, integer=True)
    if "metrics" in top:
        m = r.mapping(top["metrics"], "metrics", ("address", "port", "tls"))
        if "address" in m:
            kw["metrics_address"] = r.scalar(m["address"], "metrics.address", str)
        if "port" in m:
            port = r.scalar(m["port"], "metrics.port", (int, type(None)))
            if port is not None and not 0 <= port <= 65535:
                raise r.error(m["port"], f"must be 0..65535 or null, got {port}", "metrics.port")
            kw["metrics_port"] = port
        if "tls" in m:
            kw["metrics_tls"] = _metrics_tls(r, m["tls"])
    if "correlator" in top:
        c = r.mapping(top["correlator"], "correlator", ("window_ms", "state_window_ms", "io_window_ms"))
        for k, value in c.items():
            kw[k] = r.number(value, f"correlator.{k}", minimum=0)
    if "actions" in top:
        a = r.mapping(top["actions"], "actions", ("enabled", "dry_run", "concurrency", "timeout_s", "fsck_timeout_s",
                                                  "repair_window"))
        ak: dict[str, Any] = {}
        for k in ("enabled", "dry_run"):
            if k in a:
                ak[k] = r.scalar(a[k], f"actions.{k}", bool)
        if "concurrency" in a:
            ak["concurrency"] = r.number(a["concurrency"], "actions.concurrency", minimum=1, integer=True)
        for k in ("timeout_s", "fsck_timeout_s"):
            if k in a:
                ak[k] = float(r.number(a[k], f"actions.{k}", minimum=0.1))
        if "repair_window" in a:
            w = r.scalar(a["repair_window"], "actions.repair_window", (str, type(None)))
            if w is not None:
                try:
                    parse_window(w)
                except ValueError as e:
                    raise r.error(a["repair_window"], str(e), "actions.repair_window") from None
            ak["repair_window"] = w
        kw["actions"] = ActionsConfig(**ak)
    if "sinks" in top:
        kw.update(_sinks(r, top["sinks"]))
    if "control" in top:
        kw["control"] = _control(r, top["control"])
    sources = {s: SourceConfig() for s in SOURCES}
    if "sources" in top:
        for name, node in r.mapping(top["sources"], "sources", SOURCES).items():
            allowed = ("enabled", "interval", "fstypes") + {"bpf_alloc": ("region_mib", "figures_interval"),
                                                            "bpf_space": ("ext4_devices",)}.get(name, ())
            fields = r.mapping(node, f"sources.{name}", allowed)
            sc: dict[str, Any] = {}
            if "enabled" in fields:
                sc["enabled"] = r.scalar(fields["enabled"], f"sources.{name}.enabled", bool)
            if "interval" in fields:
                sc["interval"] = float(r.number(fields["interval"], f"sources.{name}.interval", minimum=0.01))
            if "fstypes" in fields:
                sc["fstypes"] = r.strings(fields["fstypes"], f"sources.{name}.fstypes")
            if "ext4_devices" in fields:
                sc["ext4_devices"] = r.scalar(fields["ext4_devices"], f"sources.{name}.ext4_devices", bool)
            if "region_mib" in fields:
                mib = r.number(fields["region_mib"], f"sources.{name}.region_mib", minimum=1, integer=True)
                if mib & (mib - 1):
                    raise r.error(fields["region_mib"], f"sources.{name}.region_mib must be a power of two",
                                  "region_mib")
                sc["region_mib"] = int(mib)
            if "figures_interval" in fields:
                sc["figures_interval"] = float(r.number(fields["figures_interval"],
                                                        f"sources.{name}.figures_interval", minimum=0))
            sources[name] = SourceConfig(**sc)
    kw["sources"] = sources
    if "rules" in top:
        base = os.path.dirname(os.path.abspath(file)) if not file.startswith("<") else os.getcwd()
        kw["rules"] = tuple(os.path.join(base, p) for p in r.strings(top["rules"], "rules"))
    if "ves" in top:
        node = top["ves"]
        if not isinstance(node, yaml.SequenceNode):
            raise r.error(node, f"expected a list of VEs, got {r.what(node)}", "ves")
        ves = []
        seen: set[str] = set()
        for i, vnode in enumerate(node.value):
            p = f"ves[{i}]"
            v = r.mapping(vnode, p, ("id", "mount", "device", "image", "cgroup", "labels"))
            if "id" not in v:
                raise r.error(vnode, "missing required key", f"{p}.id")
            raw_id = r.scalar(v["id"], f"{p}.id", (str, int))
            try:
                ve_id = validate_ve_id(str(raw_id))
            except ConfigError as e:
                raise r.error(v["id"], str(e), f"{p}.id") from None
            if ve_id in seen:
                raise r.error(v["id"], f"duplicate VE id {ve_id!r}", f"{p}.id")
            seen.add(ve_id)
            labels: tuple[tuple[str, str], ...] = ()
            if "labels" in v:
                lm = r.mapping(v["labels"], f"{p}.labels", tuple(k.value for k, _ in v["labels"].value)
                               if isinstance(v["labels"], yaml.MappingNode) else ())
                labels = tuple((k, str(r.scalar(n, f"{p}.labels.{k}", (str, int, float)))) for k, n in lm.items())
            ves.append(VE(
                id=ve_id,
                mounts=tuple(os.path.normpath(m) for m in r.strings(v["mount"], f"{p}.mount")) if "mount" in v else (),
                devices=r.strings(v["device"], f"{p}.device") if "device" in v else (),
                images=tuple(os.path.realpath(m) for m in r.strings(v["image"], f"{p}.image")) if "image" in v else (),
                cgroup=r.scalar(v["cgroup"], f"{p}.cgroup", str) if "cgroup" in v else None,
                labels=labels,
            ))
        kw["ves"] = tuple(ves)
    return Config(**kw)


def _sinks(r: _Reader, node: yaml.Node) -> dict[str, Any]:
    s = r.mapping(node, "sinks", ("webhooks", "syslog"))
    out: dict[str, Any] = {}
    if "webhooks" in s:
        out["webhooks"] = _webhooks(r, s["webhooks"])
    if "syslog" in s:
        y = r.mapping(s["syslog"], "sinks.syslog", ("enabled", "target", "path", "format", "ident", "facility",
                                                    "kinds", "min_severity"))
        yk: dict[str, Any] = {}
        if "enabled" in y:
            yk["enabled"] = r.scalar(y["enabled"], "sinks.syslog.enabled", bool)
        for key, choices in (("target", ("auto", "journal", "syslog")), ("format", ("rfc5424", "rfc3164")),
                             ("min_severity", SEVERITIES)):
            if key in y:
                yk[key] = _choice(r, y[key], f"sinks.syslog.{key}", choices)
        if "facility" in y:
            yk["facility"] = r.scalar(y["facility"], "sinks.syslog.facility", str)
            try:
                facility_code(yk["facility"])  # the sink's own check, so both say the same
            except ValueError as e:
                raise r.error(y["facility"], str(e), "sinks.syslog.facility") from None
        if "path" in y:
            yk["path"] = r.scalar(y["path"], "sinks.syslog.path", (str, type(None)))
            if yk["path"] is not None and len(os.fsencode(yk["path"])) > 107:
                raise r.error(y["path"], "a unix socket path must be at most 107 bytes", "sinks.syslog.path")
        if "ident" in y:
            yk["ident"] = r.scalar(y["ident"], "sinks.syslog.ident", str)
            if not yk["ident"] or any(c.isspace() for c in yk["ident"]) or len(yk["ident"]) > 48:
                raise r.error(y["ident"], "must be 1..48 characters without spaces", "sinks.syslog.ident")
        if "kinds" in y:
            yk["kinds"] = _kinds(r, y["kinds"], "sinks.syslog.kinds")
        out["syslog"] = SyslogConfig(**yk)
    return out


def _webhooks(r: _Reader, node: yaml.Node) -> tuple[WebhookConfig, ...]:
    if not isinstance(node, yaml.SequenceNode):
        raise r.error(node, f"expected a list of webhooks, got {r.what(node)}", "sinks.webhooks")
    hooks: list[WebhookConfig] = []
    for i, wnode in enumerate(node.value):
        p = f"sinks.webhooks[{i}]"
        w = r.mapping(wnode, p, ("name", "url", "kinds", "token_file", "tls_verify", "ca_file", "timeout_s",
                                 "retry_initial_s", "retry_max_s", "spool_max_bytes"))
        for required in ("name", "url"):
            if required not in w:
                raise r.error(wnode, "missing required key", f"{p}.{required}")
        name = r.scalar(w["name"], f"{p}.name", str)
        if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
            raise r.error(w["name"], "must be letters, digits, '-', '_' or '.' (it names the spool directory)",
                          f"{p}.name")
        if any(h.name == name for h in hooks):
            raise r.error(w["name"], f"duplicate webhook name {name!r}", f"{p}.name")
        url = r.scalar(w["url"], f"{p}.url", str)
        try:
            parts = webhook_url(url)  # the sink's own check, so both say the same
        except ValueError as e:
            raise r.error(w["url"], str(e), f"{p}.url") from None
        k: dict[str, Any] = {"name": name, "url": url}
        if "kinds" in w:
            k["kinds"] = _kinds(r, w["kinds"], f"{p}.kinds")
        for key in ("token_file", "ca_file"):
            if key in w:
                k[key] = r.scalar(w[key], f"{p}.{key}", (str, type(None)))
        if "tls_verify" in w:
            k["tls_verify"] = r.scalar(w["tls_verify"], f"{p}.tls_verify", bool)
        for key in ("timeout_s", "retry_initial_s", "retry_max_s"):
            if key in w:
                k[key] = float(r.number(w[key], f"{p}.{key}", minimum=0.01))
        if "spool_max_bytes" in w:
            k["spool_max_bytes"] = r.number(w["spool_max_bytes"], f"{p}.spool_max_bytes", minimum=65536, integer=True)
        if k.get("retry_max_s", 300.0) < k.get("retry_initial_s", 1.0):
            raise r.error(w.get("retry_max_s", wnode), "must not be below retry_initial_s", f"{p}.retry_max_s")
        if parts.scheme == "http" and k.get("token_file"):
            # A bearer token over plain HTTP is readable by anyone on the path; loopback is the exception.
            if parts.hostname not in ("localhost", "127.0.0.1", "::1"):
                raise r.error(w["url"], "a token_file needs an https:// URL (the token would travel in clear)",
                              f"{p}.url")
        hooks.append(WebhookConfig(**k))
    return tuple(hooks)


def _metrics_tls(r: _Reader, node: yaml.Node) -> MetricsTLSConfig | None:
    if isinstance(node, yaml.ScalarNode) and node.value in ("null", "~", ""):
        return None
    t = r.mapping(node, "metrics.tls", ("certfile", "keyfile", "client_cafile", "client_capath", "min_version"))
    # Both, or no TLS at all: prometheus-client serves plain HTTP when either is missing, and a
    # half-written TLS block must not quietly become a clear-text endpoint.
    for required in ("certfile", "keyfile"):
        if required not in t:
            raise r.error(node, "missing required key (TLS needs both certfile and keyfile)",
                          f"metrics.tls.{required}")
    k: dict[str, Any] = {}
    for key in ("certfile", "keyfile", "client_cafile", "client_capath"):
        if key in t:
            k[key] = r.scalar(t[key], f"metrics.tls.{key}", str)
            if not k[key]:
                raise r.error(t[key], "must be a path, not empty", f"metrics.tls.{key}")
    if "min_version" in t:
        # `min_version: 1.2` is a float to YAML; the quoted string means the same.
        version = str(r.scalar(t["min_version"], "metrics.tls.min_version", (str, float)))
        if version not in ("1.2", "1.3"):
            raise r.error(t["min_version"], f"expected 1.2 or 1.3, got {version}", "metrics.tls.min_version")
        k["min_version"] = version
    return MetricsTLSConfig(**k)


def _control(r: _Reader, node: yaml.Node) -> ControlConfig:
    c = r.mapping(node, "control", ("group", "max_request_bytes", "max_clients"))
    k: dict[str, Any] = {}
    if "group" in c:
        group = r.scalar(c["group"], "control.group", (str, int))
        k["group"] = str(group)
        try:
            resolve_group(k["group"])
        except KeyError:
            raise r.error(c["group"], f"no such group {group!r} on this host (see getent group)",
                          "control.group") from None
    if "max_request_bytes" in c:
        k["max_request_bytes"] = r.number(c["max_request_bytes"], "control.max_request_bytes", minimum=1024,
                                          integer=True)
    if "max_clients" in c:
        k["max_clients"] = r.number(c["max_clients"], "control.max_clients", minimum=1, integer=True)
    return ControlConfig(**k)


def resolve_group(group: str) -> int:
    """A group name or number as a gid; KeyError when the host has no such group."""
    import grp

    if group.isdigit():
        return int(group)
    return grp.getgrnam(group).gr_gid


def _choice(r: _Reader, node: yaml.Node, name: str, choices: tuple[str, ...]) -> str:
    value = r.scalar(node, name, str)
    if value not in choices:
        raise r.error(node, f"expected one of {', '.join(choices)}, got {value!r}", name)
    return value


def _kinds(r: _Reader, node: yaml.Node, name: str) -> tuple[str, ...]:
    kinds = r.strings(node, name)
    for i, k in enumerate(kinds):
        try:
            KindFilter.parse([k])
        except ValueError as e:
            item = node.value[i] if isinstance(node, yaml.SequenceNode) else node
            raise r.error(item, f"{e}; see docs/events.md", f"{name}[{i}]") from None
    return kinds


def default_config_text() -> str:
    return resources.files("fsnotifyd").joinpath("default_config.yaml").read_text()


def load_config(path: str | None) -> Config:
    if path is None:
        return parse_config(default_config_text(), "<embedded default>")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", file=path) from e
    return parse_config(text, path)

"""Who may drive the daemon: the control socket's gates, and files only root may write.

Peers here are real processes with real credentials: ``setpriv`` runs a client as uid 65534,
with or without a supplementary group, and with CAP_DAC_OVERRIDE as an ambient capability
when the test needs to get past the socket's file mode to reach the SO_PEERCRED check behind it.
"""

from __future__ import annotations

import grp
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from fsnotifyd.trust import untrusted_reason
from tests.conftest import kernel_missing
from tests.rigs.daemon import RunningDaemon

NOBODY = 65534
CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(json.dumps({"connect_error": e.errno}))
    sys.exit(0)
try:
    s.sendall(b'{"op":"status"}\\n')
except OSError:
    pass  # a refused peer may be answered and cut off before it speaks; the answer is still there
print(s.makefile("rb").readline().decode().strip())
"""


def _group() -> grp.struct_group:
    """A group this host has, other than root's, to be the control group."""
    for name in ("adm", "disk", "daemon"):
        try:
            return grp.getgrnam(name)
        except KeyError:
            continue
    pytest.fail("no adm/disk/daemon group on this host")


def _as_nobody(socket_path: str, *, groups: list[int] | None = None, dac_override: bool = False) -> dict:
    if shutil.which("setpriv") is None:
        kernel_missing("setpriv not installed (util-linux)")
    argv = ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY)]
    argv += ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
    if dac_override:
        argv += ["--inh-caps", "+dac_override", "--ambient-caps", "+dac_override"]
    r = subprocess.run([*argv, sys.executable, "-c", CLIENT, socket_path], capture_output=True, text=True,
                       timeout=30, cwd="/")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _ask(path: str, payload: bytes, timeout: float = 10.0) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        try:
            s.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon answered and closed before taking it all: its answer is still there
        return json.loads(s.makefile("rb").readline())


@pytest.fixture
def daemon(kernel, request):
    g = _group()
    # pytest's tmp_path sits below 0700 directories; the group member must reach the socket.
    work = Path(tempfile.mkdtemp(prefix="fsnd-ctl-", dir="/tmp"))
    work.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(work, ignore_errors=True))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = RunningDaemon(work / "d", metrics_port=port,
                      extra_config=f"control: {{group: {g.gr_name}, max_request_bytes: 4096}}\n")
    d.metrics_port = port
    with d:
        yield d, g


def test_socket_is_root_group_0660_and_refuses_strangers(daemon) -> None:
    d, g = daemon
    st = os.stat(d.socket)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, g.gr_gid, 0o660)
    # The file mode is the first gate: a stranger cannot connect at all.
    assert _as_nobody(d.socket) == {"connect_error": 13}  # EACCES
    # Past the file mode (CAP_DAC_OVERRIDE), SO_PEERCRED is the second gate.
    refused = _as_nobody(d.socket, dac_override=True)
    assert refused["ok"] is False and "permission denied: uid 65534" in refused["error"], refused
    # A member of the control group, by a supplementary group, may ask.
    member = _as_nobody(d.socket, groups=[g.gr_gid])
    assert member["ok"] is True and member["pid"] == d.proc.pid
    st = d.status()
    assert st["control"]["refused"] == 1
    assert "control.refused" in d.log()


def test_oversized_and_malformed_requests_get_errors_and_the_daemon_goes_on(daemon) -> None:
    d, _ = daemon
    pid = d.proc.pid
    bad = {
        b"x" * 100_000 + b"\n": "request larger than 4096 bytes",
        b"{not json\n": "not JSON",
        b"[1, 2]\n": "JSON object",
        b'{"op": "format-disk"}\n': "unknown op 'format-disk'",
        b'{"op": 7}\n': "unknown op 7",
        b'{"op": "status", "verbose": true}\n': "op 'status' takes no other keys; got 'verbose'",
        b'{"op": "tail", "kinds": "fs.error"}\n': "kinds must be a list",
        b'{"op": "tail", "kinds": ["fs.nope"]}\n': "unknown event kind 'fs.nope'",
        b'{"op": "release"}\n': "op 'release' needs 've'",
        b'{"op": "release", "ve": ["101"]}\n': "ve must be a VE id",
        b'\xff\xfe\n': "bad request",
        b"\n": "JSON object",
    }
    for payload, expected in bad.items():
        reply = _ask(d.socket, payload)
        assert reply["ok"] is False and expected in reply["error"], (payload[:40], reply)
    # A client that connects and says nothing holds up no one else.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
        idle.connect(d.socket)
        assert _ask(d.socket, b'{"op":"status"}\n')["ok"] is True
    # A release of a VE that is not isolated is an error reply, not a crash.
    reply = _ask(d.socket, b'{"op": "release", "ve": "nope"}\n')
    assert reply["ok"] is False and "not isolated" in reply["error"]
    st = d.status()
    assert st["ok"] and st["pid"] == pid and d.proc.poll() is None
    # Every one of them was counted.
    time.sleep(0.2)
    text = urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=5).read().decode()
    bad_count = next(float(x.split()[-1]) for x in text.splitlines()
                     if x.startswith('fsnotifyd_control_requests_total{op="-",result="bad"}'))
    assert bad_count >= len(bad), text
    assert 'fsnotifyd_control_requests_total{op="release",result="error"} 1.0' in text


def test_too_many_clients_are_turned_away(kernel, tmp_path: Path) -> None:
    d = RunningDaemon(tmp_path / "d", extra_config="control: {max_clients: 3}\n")
    with d:
        held = []
        try:
            for _ in range(3):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(d.socket)
                s.sendall(b'{"op":"tail"}\n')
                assert json.loads(s.makefile("rb").readline())["ok"] is True
                held.append(s)
            reply = _ask(d.socket, b'{"op":"status"}\n')
            assert reply["ok"] is False and "too many clients" in reply["error"]
        finally:
            for s in held:
                s.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if _ask(d.socket, b'{"op":"status"}\n').get("ok"):
                break
            time.sleep(0.05)
        else:
            pytest.fail("clients that left still count against max_clients")


# -- files only root may write ----------------------------------------------------------------


def _run_daemon(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fsnotifyd.cli", "run", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)


def _config(tmp_path: Path, extra: str = "") -> Path:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'state'}\nsocket: {tmp_path / 's.sock'}\n"
                   f"journal: null\nmetrics: {{port: null}}\n{extra}")
    cfg.chmod(0o644)
    return cfg


@pytest.mark.parametrize("how,expected", [
    ("chmod 0666", "is writable by everyone (mode 0666)"),
    ("chmod 0664 + group nobody", "is writable by group"),
    ("owned by nobody", "is owned by uid 65534, not root"),
    ("directory 0777", "is writable by everyone (mode 0777)"),
])
def test_daemon_refuses_a_config_others_can_write(kernel, tmp_path: Path, how: str, expected: str) -> None:
    cfg = _config(tmp_path)
    if how == "chmod 0666":
        cfg.chmod(0o666)
    elif how.startswith("chmod 0664"):
        os.chown(cfg, 0, NOBODY)
        cfg.chmod(0o664)
    elif how == "owned by nobody":
        os.chown(cfg, NOBODY, 0)
    else:
        tmp_path.chmod(0o777)
    r = _run_daemon(cfg)
    assert r.returncode == 2, r.stderr
    assert f"{cfg if how != 'directory 0777' else tmp_path}" in r.stderr and expected in r.stderr, r.stderr
    assert "refusing config file" in r.stderr
    assert not (tmp_path / "s.sock").exists()  # refused before it started anything


def test_daemon_refuses_rules_others_can_write_at_start_and_at_reload(kernel, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: []\n")
    rules.chmod(0o666)
    cfg = _config(tmp_path, f"rules: [{rules}]\n")
    r = _run_daemon(cfg)
    assert r.returncode == 2
    assert f"{rules}: refusing rules file: file {rules} is writable by everyone (mode 0666)" in r.stderr, r.stderr
    # Root-only rules start; made world-writable later, a reload refuses them and keeps the old.
    rules.chmod(0o644)
    d = RunningDaemon(tmp_path / "d", extra_config=f"rules: [{rules}]\n")
    with d:
        rules.chmod(0o666)
        reply = _ask(d.socket, b'{"op":"reload"}\n')
        assert reply["ok"] is False and any("writable by everyone" in e for e in reply["errors"]), reply
        assert d.status()["rules"]["last_reload_error"]
        rules.chmod(0o644)
        assert _ask(d.socket, b'{"op":"reload"}\n')["ok"] is True


def test_trust_rules_for_paths(tmp_path: Path) -> None:
    """The rule itself, on built trees: sticky world-writable directories (/tmp) are fine, a
    symlink from a writable place is not, group root may write."""
    if os.geteuid() != 0:
        kernel_missing("needs root (files owned by others)")
    base = tmp_path / "t"
    base.mkdir()
    base.chmod(0o755)
    f = base / "c.yaml"
    f.write_text("x")
    f.chmod(0o644)
    assert untrusted_reason(str(f)) is None
    f.chmod(0o664)  # group root
    assert untrusted_reason(str(f)) is None
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    g = sticky / "c.yaml"
    g.write_text("x")
    g.chmod(0o644)
    assert untrusted_reason(str(g)) is None
    sticky.chmod(0o777)
    assert "writable by everyone" in untrusted_reason(str(g))
    mine = tmp_path / "users"
    mine.mkdir()
    os.chown(mine, NOBODY, NOBODY)
    link = mine / "c.yaml"
    link.symlink_to(f)
    assert f"{mine} is owned by uid 65534" in untrusted_reason(str(link))

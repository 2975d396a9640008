"""The operator's install path: scripts/install.sh and uninstall.sh, staged under a directory.

Installing into the real / would change a machine other work shares (and PID 1 here is not
systemd to start the unit), so the scripts run with ``--root DIR``: the same wheel, venv,
unit, config and rules, under DIR. The staged daemon is then run from its own venv as the unit
would run it, which is what shows the wheel is complete (package data, the BPF C sources in
``share/fsnotifyd/bpf``, bcc reached through the system site packages).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from fsnotifyd.version import __version__
from tests.conftest import kernel_missing

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def staged(request) -> Path:
    if os.geteuid() != 0:
        kernel_missing("install.sh needs root")
    root = Path(tempfile.mkdtemp(prefix="fsnd-install-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(root, ignore_errors=True))
    r = subprocess.run([str(REPO / "scripts" / "install.sh"), "--root", str(root)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return root


def test_install_puts_everything_in_its_place(staged: Path) -> None:
    fsnotifyd = staged / "opt/fsnotifyd/bin/fsnotifyd"
    assert os.access(fsnotifyd, os.X_OK)
    assert os.readlink(staged / "usr/local/sbin/fsnotifyd") == "/opt/fsnotifyd/bin/fsnotifyd"
    unit = staged / "etc/systemd/system/fsnotifyd.service"
    assert unit.read_text() == (REPO / "packaging/fsnotifyd.service").read_text()
    for f in ("etc/fsnotifyd/config.yaml", "etc/fsnotifyd/rules/default.yaml"):
        st = (staged / f).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, 0, 0o644), f
    assert (staged / "usr/share/doc/fsnotifyd/prometheus/alerts.yaml").exists()
    assert (staged / "usr/share/doc/fsnotifyd/grafana/fsnotifyd-dashboard.json").exists()
    assert (staged / "usr/share/doc/fsnotifyd/docs/operator-guide.md").exists()
    share = staged / "opt/fsnotifyd/share/fsnotifyd/bpf"
    assert sorted(p.name for p in share.iterdir()) == sorted(p.name for p in (REPO / "bpf").iterdir())
    # Runtime dependencies only: the test tools stay out of the production venv.
    r = subprocess.run([str(staged / "opt/fsnotifyd/bin/python"), "-c", "import pytest"], capture_output=True)
    assert r.returncode != 0
    r = subprocess.run([str(staged / "opt/fsnotifyd/bin/python"), "-c", "import bcc, pyroute2, mfusepy, fsnotifyd"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # The C parts are in the wheel: the rules core, the journal scanner, the exporter's data path.
    r = subprocess.run([str(staged / "opt/fsnotifyd/bin/python"), "-c",
                        "import fsnotifyd.rules._decide, fsnotifyd.replay._jsonl\n"
                        "from fsnotifyd.image import fastio\nassert fastio.load() is not None"],
                       capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    # The wheel's version is fsnotifyd/version.py's (pyproject reads it there), seen from a shell.
    r = subprocess.run(f"{fsnotifyd} --version", shell=True, capture_output=True, text=True, cwd="/")
    assert (r.returncode, r.stdout) == (0, f"fsnotifyd {__version__}\n"), r.stderr
    # Completion and the man page, generated from the installed CLI's parser, where bash, zsh and man look.
    share = staged / "usr/local/share"
    bash = share / "bash-completion/completions/fsnotifyd"
    r = subprocess.run(["bash", "-c", f"source {bash}; complete -p fsnotifyd"], capture_output=True, text=True)
    assert r.returncode == 0 and "_shtab_fsnotifyd" in r.stdout, r.stderr
    assert (share / "zsh/site-functions/_fsnotifyd").read_text().startswith("#compdef fsnotifyd")
    r = subprocess.run(["man", "-l", str(share / "man/man8/fsnotifyd.8")], capture_output=True, text=True,
                       env={**os.environ, "MANPAGER": "cat"})
    assert r.returncode == 0, r.stderr
    assert "COMMAND 'fsnotifyd image check'" in r.stdout and f"fsnotifyd {__version__}" in r.stdout


def test_staged_daemon_runs_from_its_own_venv(staged: Path, bpf_ready, tmp_path: Path) -> None:
    etc = staged / "etc/fsnotifyd"
    # The installed config with this test's paths (and group root: no fsnotifyd group is made
    # by a staged install). It sits beside the installed one so `rules/default.yaml` resolves
    # to the installed rules, as it will on a host.
    text = (etc / "config.yaml").read_text()
    assert "group: fsnotifyd" in text and "- rules/default.yaml" in text
    work = tmp_path / "w"
    text = (text.replace("state_dir: /var/lib/fsnotifyd", f"state_dir: {work / 'state'}")
            .replace("socket: /run/fsnotifyd/fsnotifyd.sock", f"socket: {work / 's.sock'}")
            .replace("path: /var/lib/fsnotifyd/events.jsonl", f"path: {work / 'events.jsonl'}")
            .replace("group: fsnotifyd", "group: root").replace("port: 9857", "port: null"))
    cfg = etc / "test-config.yaml"
    cfg.write_text(text)
    cfg.chmod(0o644)
    check = subprocess.run([str(staged / "opt/fsnotifyd/bin/fsnotifyd"), "config", "check", "--config", str(cfg)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env["NOTIFY_SOCKET"] = str(tmp_path / "notify")
    proc = subprocess.Popen([str(staged / "opt/fsnotifyd/bin/fsnotifyd"), "run", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "daemon.log", "wb"), env=env, cwd="/")
    try:
        msg = notify.recv(4096).decode()
        assert "READY=1" in msg, msg
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(work / "s.sock"))
            s.sendall(b'{"op":"status"}\n')
            st = json.loads(s.makefile("rb").readline())
        down = {n: x["reason"] for n, x in st["sources"].items() if not x["up"]}
        assert not down, down  # the BPF sources found their C in share/fsnotifyd/bpf
        assert st["rules"]["files"] == [str(etc / "rules/default.yaml")]
    finally:
        proc.terminate()
        proc.wait(30)
        notify.close()
        cfg.unlink()
    assert proc.returncode == 0, (tmp_path / "daemon.log").read_text()[-3000:]


def test_reinstall_keeps_the_operators_config_and_uninstall_removes_the_rest(staged: Path) -> None:
    cfg = staged / "etc/fsnotifyd/config.yaml"
    cfg.write_text(cfg.read_text() + "# changed by the operator\n")
    r = subprocess.run([str(REPO / "scripts/install.sh"), "--root", str(staged)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert cfg.read_text().endswith("# changed by the operator\n")
    assert (staged / "etc/fsnotifyd/config.yaml.dist").read_text() == (REPO / "packaging/config.yaml").read_text()
    r = subprocess.run([str(REPO / "scripts/uninstall.sh"), "--root", str(staged)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for gone in ("opt/fsnotifyd", "etc/systemd/system/fsnotifyd.service", "usr/local/sbin/fsnotifyd",
                 "usr/share/doc/fsnotifyd", "usr/local/share/bash-completion/completions/fsnotifyd",
                 "usr/local/share/zsh/site-functions/_fsnotifyd", "usr/local/share/man/man8/fsnotifyd.8"):
        assert not os.path.lexists(staged / gone), gone
    assert cfg.exists()  # kept without --purge
    r = subprocess.run([str(REPO / "scripts/uninstall.sh"), "--root", str(staged), "--purge"], capture_output=True,
                       text=True)
    assert r.returncode == 0 and not (staged / "etc/fsnotifyd").exists()

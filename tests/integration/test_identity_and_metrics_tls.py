"""What every host daemon has: its version everywhere it speaks, the process metrics, HTTPS.

A real daemon subprocess; certificates made by openssl in the test; scrapes over real TCP.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fsnotifyd.version import __version__
from tests.rigs.daemon import RunningDaemon
from tests.rigs.net import free_port

pytestmark = pytest.mark.kernel


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fsnotifyd", *args], capture_output=True, text=True)


def openssl(*args: str) -> None:
    r = subprocess.run(["openssl", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 signed by it, a client certificate signed by it,
    and a second, unrelated key (for the mismatch case)."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=fsnotifyd test CA",
            "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    for name, cn, ext in (("server", "127.0.0.1", "subjectAltName=IP:127.0.0.1"), ("client", "prometheus", None)):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", str(d / f"{name}.key"),
                "-out", str(d / f"{name}.csr"))
        extfile = d / f"{name}.ext"
        extfile.write_text(f"{ext}\n" if ext else "basicConstraints=CA:FALSE\n")
        openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
                "-CAcreateserial", "-days", "2", "-extfile", str(extfile), "-out", str(d / f"{name}.pem"))
    openssl("genrsa", "-out", str(d / "other.key"), "2048")
    return d


def with_metrics(d: RunningDaemon, port: int, tls: str) -> RunningDaemon:
    """The rig writes `metrics: {...}` on one line; put the TLS block in its place."""
    text = d.config.read_text().replace("metrics: {address: 127.0.0.1, port: null}\n",
                                        f"metrics:\n  address: 127.0.0.1\n  port: {port}\n  tls:\n{tls}")
    assert "tls:" in text
    d.config.write_text(text)
    return d


def test_version_from_a_shell() -> None:
    r = subprocess.run(f"{sys.executable} -m fsnotifyd --version", shell=True, capture_output=True, text=True)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"fsnotifyd {__version__}\n", "")


def test_version_in_status_tail_and_metrics_and_the_process_collector(tmp_path: Path) -> None:
    port = free_port()
    with RunningDaemon(tmp_path / "d", metrics_port=port) as d:
        started = time.time()
        text = cli("status", "--socket", d.socket)
        assert text.returncode == 0, text.stderr
        assert text.stdout.startswith(f"fsnotifyd {__version__} pid {d.proc.pid}, up ")
        st = json.loads(cli("status", "--json", "--socket", d.socket).stdout)
        assert st["ok"] and st["version"] == __version__ and st["pid"] == d.proc.pid
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # the stream's greeting
            s.connect(d.socket)
            s.sendall(b'{"op":"tail"}\n')
            assert json.loads(s.makefile("rb").readline()) == {"ok": True, "version": __version__}
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert any(line.startswith(f'fsnotifyd_build_info{{kernel="{os.uname().release}",python="')
                   and f'version="{__version__}"}} 1.0' in line for line in metrics.splitlines()), metrics[:2000]
        values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                  if line.startswith("process_") and " " in line}
        with open(f"/proc/{d.proc.pid}/status") as f:
            rss = next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmRSS:"))
        # The daemon's own process, not the test's: its RSS within a factor, its fds, its start.
        assert 0.5 * rss < values["process_resident_memory_bytes"] < 2 * rss
        assert values["process_open_fds"] >= 5
        assert started - 30 < values["process_start_time_seconds"] <= started
        assert 'python_info{' in metrics
    ready = [json.loads(line) for line in d.log().splitlines() if '"daemon.ready"' in line]
    assert ready and ready[0]["version"] == __version__  # the journal says which version started


def scrape(port: int, ctx: ssl.SSLContext) -> str:
    return urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", context=ctx, timeout=5).read().decode()


def test_https_endpoint_with_a_client_ca(tmp_path: Path, pki: Path) -> None:
    """Server cert verified against the CA; no client certificate, no scrape; plain HTTP gets
    no metrics; a client that connects and never says hello holds up no other scrape."""
    port = free_port()
    d = with_metrics(RunningDaemon(tmp_path / "d"), port,
                     f"    certfile: {pki / 'server.pem'}\n    keyfile: {pki / 'server.key'}\n"
                     f"    client_cafile: {pki / 'ca.pem'}\n")
    check = cli("config", "check", "--config", str(d.config), "--json")
    assert check.returncode == 0 and json.loads(check.stdout)["ok"], check.stdout + check.stderr
    with d:
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionResetError)):
            scrape(port, ctx)  # refused: the CA given means a certificate is required
        ctx.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
        idle = socket.create_connection(("127.0.0.1", port))  # never sends a ClientHello
        try:
            t0 = time.monotonic()
            text = scrape(port, ctx)
            assert time.monotonic() - t0 < 3
        finally:
            idle.close()
        assert f'version="{__version__}"' in text and "process_resident_memory_bytes" in text
        with pytest.raises(OSError):  # plain HTTP on the TLS port: the connection is dropped, no metrics
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    assert "metrics.unavailable" not in d.log()


def test_https_without_client_ca_serves_any_client(tmp_path: Path, pki: Path) -> None:
    port = free_port()
    d = with_metrics(RunningDaemon(tmp_path / "d"), port,
                     f"    certfile: {pki / 'server.pem'}\n    keyfile: {pki / 'server.key'}\n    min_version: 1.3\n")
    with d:
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        assert "fsnotifyd_build_info" in scrape(port, ctx)
        old = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises((ssl.SSLError, urllib.error.URLError)):
            scrape(port, old)  # below min_version


def test_config_check_and_start_with_a_key_that_does_not_match(tmp_path: Path, pki: Path) -> None:
    """config check says which files, exit 2; the daemon starts without the endpoint and says why."""
    port = free_port()
    d = with_metrics(RunningDaemon(tmp_path / "d"), port,
                     f"    certfile: {pki / 'server.pem'}\n    keyfile: {pki / 'other.key'}\n")
    check = cli("config", "check", "--config", str(d.config))
    assert check.returncode == 2 and f"cannot load certificate {pki / 'server.pem'} with key {pki / 'other.key'}" \
        in check.stderr, check.stderr
    as_json = cli("config", "check", "--config", str(d.config), "--json")
    assert as_json.returncode == 2 and json.loads(as_json.stdout)["ok"] is False
    with d:
        assert "metrics.unavailable" in d.log()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()

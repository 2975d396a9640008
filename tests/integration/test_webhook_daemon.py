"""The daemon's webhook sink end to end: real ext4 errors, a real HTTP server on loopback that
is down, comes up, goes down again, and a daemon restart in between. Every fs.* event the
daemon journaled must reach the endpoint exactly once, as a CloudEvent whose id is the event's.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.rigs.daemon import RunningDaemon
from tests.rigs.loop import loop_ext4


class Endpoint:
    """A webhook receiver that can be stopped and started again on the same port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[dict] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        received, lock = self.received, self.lock

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with lock:
                    received.append({"content_type": self.headers["Content-Type"], **json.loads(body)})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def ids(self) -> list[str]:
        with self.lock:
            return [e["id"] for e in self.received]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _journal_ids(d: RunningDaemon) -> list[str]:
    return [e["id"] for e in d.journal_events() if e["kind"].startswith("fs.")]


def _wait_delivered(d: RunningDaemon, ep: Endpoint, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if set(_journal_ids(d)) <= set(ep.ids()):
            return
        time.sleep(0.05)
    missing = set(_journal_ids(d)) - set(ep.ids())
    raise AssertionError(f"{len(missing)} journaled events never delivered: {sorted(missing)[:5]}")


def _errors(fs, n: int, tag: str) -> None:
    for i in range(n):
        fs.sysfs.joinpath("trigger_fs_error").write_text(f"{tag} {i}\n")
        time.sleep(0.15)  # apart, so each is its own event


def test_no_event_lost_or_doubled_across_outages_and_a_restart(kernel, tmp_path: Path) -> None:
    port = _free_port()
    ep = Endpoint(port)
    (tmp_path / "fs").mkdir()
    try:
        with loop_ext4(32, workdir=tmp_path / "fs") as fs:
            d = RunningDaemon(tmp_path / "d", extra_config=(
                f"ves:\n  - id: ve-hook\n    mount: {fs.mountpoint}\n"
                "sinks:\n  webhooks:\n"
                f"    - {{name: ops, url: 'http://127.0.0.1:{port}/hook', kinds: ['fs.*'],"
                " retry_initial_s: 0.05, retry_max_s: 0.3, timeout_s: 2}\n"))
            with d:
                d.wait_marked(fs)
                _errors(fs, 4, "endpoint down")  # nothing listens yet
                deadline = time.monotonic() + 10
                while len(_journal_ids(d)) < 4 and time.monotonic() < deadline:
                    time.sleep(0.05)
                hook = d.status()["sinks"]["webhook:ops"]
                assert len(_journal_ids(d)) >= 4 and ep.ids() == []
                assert hook["last_error"], hook
            # The daemon stopped with its events spooled; they must survive into the next run.
            spooled = _journal_ids(d)
            ep.start()
            with d:  # restart: same state dir, same spool
                _wait_delivered(d, ep)
                assert set(spooled) <= set(ep.ids())
                _errors(fs, 2, "endpoint up")
                _wait_delivered(d, ep)
                ep.stop()  # a second outage, mid-run
                _errors(fs, 3, "endpoint down again")
                time.sleep(0.5)
                ep.start()
                _wait_delivered(d, ep)
                time.sleep(1.0)  # a late duplicate would show up in this time
                journal = _journal_ids(d)
            ids = ep.ids()
            assert len(ids) == len(set(ids)), "an event was delivered twice"
            assert set(ids) == set(journal) and len(journal) >= 9
            for ev in ep.received:
                assert ev["specversion"] == "1.0" and ev["type"] == f"io.fsnotifyd.{ev['data']['kind']}"
                assert ev["content_type"].startswith("application/cloudevents+json")
                assert ev["data"]["id"] == ev["id"] and ev["subject"] == "ve-hook"
    finally:
        ep.stop()

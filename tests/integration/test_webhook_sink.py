"""The webhook sink against a real HTTP(S) server on loopback: no mocks.

Each test runs a ``ThreadingHTTPServer`` on 127.0.0.1 (port 0, or a port reserved earlier so
the endpoint can be "down" first and come up later) that records every POST and answers as the
test says. "Delivered" at the server means answered 2xx; attempts are recorded separately, so
"exactly once" and "same id on every retry" are checked on what really went over the wire.
Retry intervals are tens of milliseconds so outages are short. Every server, sink and thread a
test starts is stopped in the fixture's finaliser, failed test or not.
"""

from __future__ import annotations

import http.server
import json
import os
import random
import shutil
import socket
import ssl
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from fsnotifyd.config import WebhookConfig
from fsnotifyd.errors import ConfigError
from fsnotifyd.events import Device, Event, Kernel, rfc3339
from fsnotifyd.metrics import Metrics
from fsnotifyd.sinks.webhook import REJECTED, Backoff, RateLimit, WebhookSink, retryable
from fsnotifyd.version import __version__
from tests.rigs.net import free_port

HOST = "vm7"
FAST = dict(retry_initial_s=0.05, retry_max_s=0.2, timeout_s=5.0)


# -- the endpoint --------------------------------------------------------------------------------


@dataclass
class Request:
    headers: dict[str, str]
    body: bytes
    status: int
    json: dict

    @property
    def id(self) -> str:
        return self.json["id"]


# (the parsed body, how many times this id was POSTed before) -> (status, extra headers)
Responder = Callable[[dict, int], tuple[int, dict[str, str]]]


def accept_all(body: dict, seen: int) -> tuple[int, dict[str, str]]:
    return 200, {}


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True  # server_close() joins the handler threads (after their sockets are shut)

    def handle_error(self, request, client_address) -> None:
        pass  # TLS handshakes a test makes fail, connections shut at stop: expected here


class Endpoint:
    """A webhook receiver: records every POST (in arrival order) and answers via ``responder``."""

    def __init__(self, port: int = 0, tls: tuple[str, str] | None = None, idle_timeout: float | None = None) -> None:
        self.port = port
        self.tls = tls
        self.idle_timeout = idle_timeout
        self.responder: Responder = accept_all
        self.requests: list[Request] = []
        self.seen: dict[str, int] = {}  # POSTs per CloudEvents id
        self.ok = 0  # POSTs answered 2xx
        self.connections = 0  # TCP connections accepted
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/hooks/fs?x=1"

    def start(self) -> Endpoint:
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real receiver would
            disable_nagle_algorithm = True  # else each answer waits for a delayed ACK (40 ms)
            timeout = endpoint.idle_timeout  # a kept-alive connection idle this long is closed

            def setup(self) -> None:
                super().setup()
                with endpoint.lock:
                    endpoint._conns.add(self.connection)
                    endpoint.connections += 1

            def finish(self) -> None:
                with endpoint.lock:
                    endpoint._conns.discard(self.connection)
                super().finish()

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with endpoint.lock:
                    parsed = json.loads(body)
                    seen = endpoint.seen.get(parsed["id"], 0)
                    endpoint.seen[parsed["id"]] = seen + 1
                    status, extra = endpoint.responder(parsed, seen)
                    endpoint.requests.append(Request(dict(self.headers.items()), body, status, parsed))
                    endpoint.ok += 200 <= status < 300
                    endpoint.arrived.notify_all()
                reply = json.dumps({"status": status}).encode()
                self.send_response(status)
                for k, v in extra.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args) -> None:
                pass

        server = _Server(("127.0.0.1", self.port), Handler)
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*self.tls)
            # The handshake happens in the handler thread, not in the accept loop.
            server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        with self.lock:
            conns = list(self._conns)
        for c in conns:
            try:
                socket.socket.shutdown(c, socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    # -- what arrived ------------------------------------------------------------------------
    def delivered(self) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if 200 <= r.status < 300]

    def delivered_ids(self) -> list[str]:
        return [r.id for r in self.delivered()]

    def attempts(self, event_id: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.id == event_id]

    def wait_delivered(self, n: int, timeout: float = 30.0) -> list[str]:
        deadline = time.monotonic() + timeout
        with self.lock:
            while self.ok < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.arrived.wait(left)
        return self.delivered_ids()

    def wait_requests(self, n: int, timeout: float = 30.0) -> list[Request]:
        deadline = time.monotonic() + timeout
        with self.lock:
            while len(self.requests) < n and (left := deadline - time.monotonic()) > 0:
                self.arrived.wait(left)
            return list(self.requests)



def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


# -- fixtures ------------------------------------------------------------------------------------


@dataclass
class Harness:
    tmp: Path
    stack: ExitStack
    metrics: Metrics = field(default_factory=Metrics)

    @property
    def spool_dir(self) -> str:
        return str(self.tmp / "spool" / "webhook-test")

    def endpoint(self, port: int = 0, tls: tuple[str, str] | None = None,
                 idle_timeout: float | None = None) -> Endpoint:
        ep = Endpoint(port, tls, idle_timeout).start()
        self.stack.callback(ep.stop)
        return ep

    def sink(self, url: str, start: bool = True, metrics: Metrics | None = None, **kw) -> WebhookSink:
        cfg = WebhookConfig(name="test", url=url, **{**FAST, **kw})
        sink = WebhookSink(cfg, self.spool_dir, metrics or self.metrics, host=HOST)
        # Closed before the endpoints stop (LIFO), so no handler thread waits on a live client.
        self.stack.callback(sink.close)
        if start:
            sink.start()
        return sink

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    before = set(threading.enumerate())
    with ExitStack() as stack:
        yield Harness(tmp_path, stack)
    left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not left, f"threads left running: {left}"


def event(i: int, kind: str = "fs.error", ve: str | None = "101", device: str | None = "loop3") -> Event:
    return Event(
        kind=kind, time=1_795_680_000.123456 + i, host=HOST, severity="error",
        device=None if device is None else Device(7, 3, device), fs="ext4", mount="/vz/101", ve=ve,
        kernel=Kernel(errno=-5, function="ext4_lookup", line=1855, inode=2, comm="ls", pid=4242,
                      message=f"EXT4-fs error (device loop3): ext4_lookup:1855: event {i}"),
        sources=("kmsg",), count=1, details={"n": i},
    )


def check_cloudevent(req: Request, ev: Event) -> None:
    assert req.headers["Content-Type"] == "application/cloudevents+json; charset=utf-8"
    assert req.headers["User-Agent"] == f"fsnotifyd/{__version__}"
    body = req.json
    expected = {
        "specversion": "1.0",
        "id": ev.id,
        "source": f"fsnotifyd://{HOST}",
        "type": f"io.fsnotifyd.{ev.kind}",
        "time": rfc3339(ev.time),
        "datacontenttype": "application/json",
        "severity": ev.severity,
        "data": json.loads(ev.to_json()),
    }
    subject = ev.ve or (ev.device.name if ev.device else None)
    if subject is not None:
        expected["subject"] = subject
    assert body == expected
    assert body["time"].endswith("Z") and "T" in body["time"]


# -- the tests -----------------------------------------------------------------------------------


def test_down_then_up_delivers_all_in_order_once(h):
    """50 events published while nothing listens arrive, in order, once each, once the endpoint
    comes up on its port; each is a CloudEvents 1.0 structured event with the right headers."""
    port = free_port()
    sink = h.sink(f"http://127.0.0.1:{port}/hooks/fs?x=1")
    # Subject from the VE, from the device when there is no VE, absent when neither.
    events = [event(i, ve=("101" if i % 3 == 0 else None), device=("loop3" if i % 3 == 1 else None))
              for i in range(50)]
    for ev in events:
        sink.publish(ev)
    wait_until(lambda: sink.status()["retried"] >= 2, what="retries against the closed port")
    st = sink.status()
    assert st["delivered"] == 0 and st["spooled_events"] == 50
    assert "refused" in st["last_error"].lower()
    assert st["next_retry"] is not None and st["oldest_seconds"] > 0
    assert h.sample("fsnotifyd_webhook_spool_events", sink="webhook:test") == 50

    ep = h.endpoint(port)
    ids = ep.wait_delivered(50)
    assert ids == [e.id for e in events]
    assert len(ep.requests) == 50  # nothing sent twice
    for req, ev in zip(ep.delivered(), events, strict=True):
        check_cloudevent(req, ev)
        assert "Authorization" not in req.headers
    assert {r.json.get("subject") for r in ep.requests} == {"101", "loop3", None}
    assert not any("subject" in r.json for r, e in zip(ep.requests, events, strict=True)
                   if e.ve is None and e.device is None)
    wait_until(lambda: sink.status()["delivered"] == 50, what="the sink to count its deliveries")
    st = sink.status()
    assert st["spooled_events"] == 0 and st["last_success"] is not None and st["next_retry"] is None
    assert h.sample("fsnotifyd_webhook_deliveries_total", sink="webhook:test", outcome="delivered") == 50
    assert h.sample("fsnotifyd_webhook_deliveries_total", sink="webhook:test", outcome="retried") >= 2
    assert h.sample("fsnotifyd_webhook_spool_events", sink="webhook:test") == 0
    assert h.sample("fsnotifyd_webhook_oldest_spooled_seconds", sink="webhook:test") == 0


def test_5xx_is_retried_with_the_same_id(h):
    """503 for the first 3 attempts of one event: retried, every attempt the same id and the same
    bytes, delivered once; the events behind it wait their turn (order)."""
    ep = h.endpoint()
    events = [event(i) for i in range(3)]
    flaky = events[1].id
    ep.responder = lambda body, seen: (503, {}) if body["id"] == flaky and seen < 3 else (200, {})
    sink = h.sink(ep.url)
    with capture_logs() as logs:
        for ev in events:
            sink.publish(ev)
        assert ep.wait_delivered(3) == [e.id for e in events]
        wait_until(lambda: sink.status()["delivered"] == 3, what="the sink to count its deliveries")
    assert not any(e["event"] == "webhook.sender_error" for e in logs)
    tries = ep.attempts(flaky)
    assert [r.status for r in tries] == [503, 503, 503, 200]
    assert len({r.body for r in tries}) == 1
    assert [r.id for r in ep.requests] == [events[0].id, flaky, flaky, flaky, flaky, events[2].id]
    assert h.sample("fsnotifyd_webhook_deliveries_total", sink="webhook:test", outcome="retried") == 3
    assert h.sample("fsnotifyd_webhook_deliveries_total", sink="webhook:test", outcome="delivered") == 3
    retry_logs = [e for e in logs if e["event"] == "webhook.retry"]
    assert retry_logs and retry_logs[0]["status"] == 503 and retry_logs[0]["log_level"] == "warning"
    assert len(retry_logs) == 1  # the streak is logged once, not once per attempt
    recovered = [e for e in logs if e["event"] == "webhook.recovered"]
    assert len(recovered) == 1 and recovered[0]["attempts"] == 3
    assert not (Path(h.spool_dir) / REJECTED).exists()


def test_retry_after_is_honoured_and_capped(h):
    """Retry-After makes the sink wait longer than its backoff (1 s against 0.05 s), but never
    longer than retry_max_s (3600 s asked, 0.5 s waited)."""
    ep = h.endpoint()
    stamps: list[float] = []

    def respond(body: dict, seen: int) -> tuple[int, dict[str, str]]:
        stamps.append(time.monotonic())
        return [(429, {"Retry-After": "1"}), (503, {"Retry-After": "3600"}), (200, {})][min(seen, 2)]

    ep.responder = respond
    sink = h.sink(ep.url, retry_initial_s=0.05, retry_max_s=1.5)
    sink.publish(event(0))
    ep.wait_delivered(1)
    assert [r.status for r in ep.requests] == [429, 503, 200]
    assert 0.95 <= stamps[1] - stamps[0] < 1.5 + 0.5
    assert 1.45 <= stamps[2] - stamps[1] < 1.5 + 0.5  # capped at retry_max_s, not an hour
    assert sink.status()["retried"] == 2


def test_idle_connection_closed_by_the_server_is_no_outage(h):
    """The endpoint drops kept-alive connections after 0.1 s idle: the next event goes out on a
    new connection at once, with no retry counted and no backoff."""
    ep = h.endpoint(idle_timeout=0.1)
    sink = h.sink(ep.url, retry_initial_s=30.0, retry_max_s=60.0)
    events = [event(i) for i in range(3)]
    for i, ev in enumerate(events):
        sink.publish(ev)
        assert ep.wait_delivered(i + 1, timeout=10) == [e.id for e in events[: i + 1]]
        time.sleep(0.3)  # past the server's idle timeout: it has closed the connection
    wait_until(lambda: sink.status()["delivered"] == 3, what="the sink to count its deliveries")
    assert sink.status()["retried"] == 0 and sink.status()["last_error"] is None
    assert len(ep.requests) == 3
    assert ep.connections == 3


def test_dead_letter_unwritable_keeps_the_event(h):
    """A 400 whose dead-letter line cannot be written is not acknowledged: the event stays in the
    spool and is retried, and dead-lettered once the file can be written."""
    ep = h.endpoint()
    ev = event(0)
    ep.responder = lambda body, seen: (400, {}) if body["id"] == ev.id else (200, {})
    blocker = Path(h.spool_dir) / REJECTED
    blocker.mkdir(parents=True)  # a directory where the file should be: open() fails
    sink = h.sink(ep.url)
    sink.publish(ev)
    sink.publish(event(1))
    ep.wait_requests(3)
    st = sink.status()
    assert st["rejected"] == 0 and st["spooled_events"] == 2 and "dead-letter" in st["last_error"]
    assert ep.delivered() == []
    blocker.rmdir()
    ep.wait_delivered(1)
    wait_until(lambda: sink.status()["delivered"] == 1, what="the second event delivered")
    dead = [json.loads(x) for x in blocker.read_text().splitlines()]
    assert [d["event"]["id"] for d in dead] == [ev.id]
    assert sink.status()["rejected"] == 1 and sink.status()["spooled_events"] == 0


def test_restart_resumes_the_spool_without_resending(h):
    """Delivered before a close: never sent again. Published while down, then close(), then a
    NEW sink on the same spool dir: all delivered exactly once, in order."""
    ep = h.endpoint()
    port = ep.port
    first = [event(i) for i in range(5)]
    sink = h.sink(ep.url)
    for ev in first:
        sink.publish(ev)
    assert ep.wait_delivered(5) == [e.id for e in first]
    wait_until(lambda: sink.status()["spooled_events"] == 0, what="the first events acknowledged")
    ep.stop()

    pending = [event(i) for i in range(5, 25)]
    for ev in pending:
        sink.publish(ev)
    wait_until(lambda: sink.status()["retried"] >= 1, what="a failed attempt while down")
    sink.close()
    assert sink.status()["spooled_events"] == 20
    cursor = json.loads((Path(h.spool_dir) / "cursor").read_text())
    assert cursor["offset"] > 0

    ep2 = h.endpoint(port)
    sink2 = h.sink(ep2.url, metrics=Metrics())
    assert sink2.status()["spooled_events"] == 20
    assert ep2.wait_delivered(20) == [e.id for e in pending]
    wait_until(lambda: sink2.status()["spooled_events"] == 0, what="the resumed events acknowledged")
    assert len(ep2.requests) == 20
    assert not {r.id for r in ep2.requests} & {e.id for e in first}
    assert len(ep.requests) == 5


def test_close_interrupts_the_backoff(h):
    """close() during a long backoff returns at once and leaves the event on disk."""
    sink = h.sink(f"http://127.0.0.1:{free_port()}/", retry_initial_s=60.0, retry_max_s=120.0)
    sink.publish(event(0))
    wait_until(lambda: sink.status()["next_retry"] is not None, what="the first failure")
    t0 = time.monotonic()
    sink.close()
    assert time.monotonic() - t0 < 1.0
    assert not sink.status()["running"]
    assert sink.status()["spooled_events"] == 1


def test_close_interrupts_a_hung_post(h):
    """An endpoint that accepts and never answers: close() shuts the socket after half its timeout."""
    hang = socket.socket()
    h.stack.callback(hang.close)
    hang.bind(("127.0.0.1", 0))
    hang.listen(1)
    sink = h.sink(f"http://127.0.0.1:{hang.getsockname()[1]}/", timeout_s=60.0)
    sink.publish(event(0))
    conn, _ = hang.accept()
    h.stack.callback(conn.close)
    t0 = time.monotonic()
    sink.close(timeout=1.0)
    assert time.monotonic() - t0 < 1.5
    assert not sink.status()["running"]
    assert sink.status()["spooled_events"] == 1


def test_spool_bound_drops_oldest_and_counts(h):
    """Endpoint down, a small spool, many events: the oldest are dropped and counted as lost
    (spool_full), the spool stays within its bound, the newest arrive, in order."""
    port = free_port()
    max_bytes = 64 << 10
    sink = h.sink(f"http://127.0.0.1:{port}/", spool_max_bytes=max_bytes)
    events = [event(i) for i in range(400)]  # ~1.1 KB each: ~440 KB into a 64 KB spool
    for ev in events:
        sink.publish(ev)
        assert sink.status()["spool_bytes"] <= max_bytes
    # Two more failed attempts: the second began after the last drop, so the sender holds a
    # record that is still spooled (not one the bound dropped while it was being POSTed).
    retried = sink.status()["retried"]
    wait_until(lambda: sink.status()["retried"] >= retried + 2, what="attempts after the last drop")
    lost = h.sample("fsnotifyd_events_lost_total", source="webhook:test", reason="spool_full")
    st = sink.status()
    assert lost > 300
    assert st["lost"] == {"spool_full": lost}
    assert st["spooled_events"] + lost == 400
    assert h.sample("fsnotifyd_webhook_spool_bytes", sink="webhook:test") == st["spool_bytes"]

    ep = h.endpoint(port)
    kept = 400 - int(lost)
    ids = ep.wait_delivered(kept)
    assert ids == [e.id for e in events[-kept:]]
    wait_until(lambda: sink.status()["spooled_events"] == 0, what="the spool to empty")
    assert len(ep.requests) == kept
    assert ep.requests[-1].id == events[-1].id


def test_4xx_is_dead_lettered_and_the_queue_moves_on(h):
    """400 for one event: written to rejected.jsonl with the status and answer, counted, logged
    as an error; the events after it are still delivered."""
    ep = h.endpoint()
    events = [event(i) for i in range(5)]
    bad = events[2].id
    ep.responder = lambda body, seen: (400, {}) if body["id"] == bad else (200, {})
    sink = h.sink(ep.url)
    with capture_logs() as logs:
        for ev in events:
            sink.publish(ev)
        ids = ep.wait_delivered(4)
        wait_until(lambda: sink.status()["delivered"] == 4, what="the sink to count its deliveries")
    assert not any(e["event"] == "webhook.sender_error" for e in logs)
    assert sink.status()["spooled_events"] == 0
    assert ids == [e.id for e in events if e.id != bad]
    assert len(ep.attempts(bad)) == 1  # refused for good: not retried
    lines = (Path(h.spool_dir) / REJECTED).read_text().splitlines()
    assert len(lines) == 1
    dead = json.loads(lines[0])
    assert dead["status"] == 400 and json.loads(dead["response"]) == {"status": 400}
    assert dead["event"]["id"] == bad and dead["event"]["specversion"] == "1.0"
    assert dead["rejected_at"].endswith("Z")
    assert h.sample("fsnotifyd_webhook_deliveries_total", sink="webhook:test", outcome="rejected") == 1
    assert h.sample("fsnotifyd_webhook_deliveries_total", sink="webhook:test", outcome="delivered") == 4
    errors = [e for e in logs if e["event"] == "webhook.rejected"]
    assert len(errors) == 1 and errors[0]["log_level"] == "error" and errors[0]["status"] == 400
    st = sink.status()
    assert st["rejected"] == 1 and "400" in st["last_error"]


def test_bearer_token_and_401_is_retried(h, tmp_path):
    """The token file's content (whitespace stripped) is sent as a bearer token; a 401 is
    retried (an operator fixes credentials), not dead-lettered, and delivers once accepted."""
    token = tmp_path / "token"
    token.write_text("  s3cr3t-t0ken\n")
    ep = h.endpoint()
    accept = threading.Event()
    ep.responder = lambda body, seen: (200, {}) if accept.is_set() else (401, {"WWW-Authenticate": "Bearer"})
    sink = h.sink(ep.url, token_file=str(token))
    ev = event(0)
    sink.publish(ev)
    tries = ep.wait_requests(3)
    assert [r.status for r in tries[:3]] == [401, 401, 401]
    assert all(r.headers["Authorization"] == "Bearer s3cr3t-t0ken" for r in tries)
    st = sink.status()
    assert "401" in st["last_error"] and st["rejected"] == 0 and st["spooled_events"] == 1
    assert not (Path(h.spool_dir) / REJECTED).exists()
    accept.set()
    assert ep.wait_delivered(1) == [ev.id]
    wait_until(lambda: sink.status()["delivered"] == 1, what="the sink to count its delivery")
    assert h.sample("fsnotifyd_webhook_deliveries_total", sink="webhook:test", outcome="rejected") == 0
    assert sink.status()["spooled_events"] == 0


def test_missing_token_file_is_a_config_error(h, tmp_path):
    missing = tmp_path / "no-such-token"
    sink = h.sink("http://127.0.0.1:9/", start=False, token_file=str(missing))
    with pytest.raises(ConfigError) as info:
        sink.start()
    assert str(missing) in str(info.value) and "token_file" in str(info.value)
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    with pytest.raises(ConfigError, match="empty"):
        h.sink("http://127.0.0.1:9/", start=False, token_file=str(empty)).start()


def test_full_disk_holds_events_in_memory_not_the_spool(h, tmp_path):
    """The spool's filesystem fills up (a 64 KiB tmpfs): publish neither raises nor blocks, the
    events that do not fit are held in memory (said once, none lost), and no torn line is left
    behind: all are delivered, in order, once the endpoint is up, the disk still full."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "fsnotifyd-test", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    h.stack.callback(subprocess.run, ["umount", "-l", str(mnt)], check=False)
    port = free_port()
    cfg = WebhookConfig(name="test", url=f"http://127.0.0.1:{port}/", spool_max_bytes=1 << 20, **FAST)
    sink = WebhookSink(cfg, str(mnt / "spool"), h.metrics, host=HOST)
    h.stack.callback(sink.close)  # before the umount (LIFO)
    sink.start()
    events = [event(i) for i in range(120)]  # ~100 KB: more than the tmpfs holds
    with capture_logs() as logs:
        for ev in events:
            sink.publish(ev)
    st = sink.status()
    stored, held = st["spooled_events"], st["memory_events"]
    assert held > 0 and stored > 20 and stored + held == 120
    assert st["spool_failing"] and st["spool_errno"] == "ENOSPC" and st["lost"] == {}
    assert h.sample("fsnotifyd_webhook_memory_events", sink="webhook:test") == held
    assert sum(e["event"] == "webhook.spool_failing" for e in logs) == 1  # once, not per event
    for seg in (mnt / "spool").glob("*.jsonl"):
        data = seg.read_bytes()
        assert data.endswith(b"\n") or not data
        assert all(json.loads(x)["specversion"] == "1.0" for x in data.splitlines())
    ep = h.endpoint(port)
    assert ep.wait_delivered(120) == [e.id for e in events]
    wait_until(lambda: sink.status()["delivered"] == 120, what="the sink to count its deliveries")
    assert len(ep.requests) == 120 and sink.status()["memory_events"] == 0
    sink.close()  # on a full disk: the cursor may not be writable, close must still work
    assert not sink.status()["running"] and sink.status()["lost"] == {}


def test_kinds_filter(h):
    """kinds ["fs.*", "dev.remove"]: a prefix and an exact kind; the rest is not spooled."""
    ep = h.endpoint()
    sink = h.sink(ep.url, kinds=("fs.*", "dev.remove"))
    evs = [event(0, "fs.error"), event(1, "dev.add"), event(2, "fs.readonly"), event(3, "dev.remove"),
           event(4, "source.up")]
    for ev in evs:
        sink.publish(ev)
    assert ep.wait_delivered(3) == [evs[0].id, evs[2].id, evs[3].id]
    assert sink.status()["filtered"] == 2
    assert [r.json["type"] for r in ep.requests] == ["io.fsnotifyd.fs.error", "io.fsnotifyd.fs.readonly",
                                                     "io.fsnotifyd.dev.remove"]


def test_storm_of_10000(h):
    """10,000 publishes return quickly (the network is never waited for) and all 10,000 arrive,
    exactly once, in order."""
    ep = h.endpoint()
    sink = h.sink(ep.url)
    events = [event(i) for i in range(10_000)]
    durations = []
    for ev in events:
        t0 = time.perf_counter()
        sink.publish(ev)
        durations.append(time.perf_counter() - t0)
    assert statistics.median(durations) < 0.002
    assert sorted(durations)[int(len(durations) * 0.99)] < 0.02
    assert sum(durations) < 10.0
    ids = ep.wait_delivered(10_000, timeout=180)
    assert len(ids) == 10_000
    assert ids == [e.id for e in events]
    wait_until(lambda: sink.status()["spooled_events"] == 0, what="the spool to empty")
    assert len(ep.requests) == 10_000
    assert ep.connections == 1  # kept alive throughout
    # Fully delivered segments are reclaimed: one (the one being appended to) is left.
    assert len([p for p in Path(h.spool_dir).iterdir() if p.name.endswith(".jsonl")]) == 1


def test_backoff_doubles_with_jitter_up_to_the_cap():
    b = Backoff(initial=1.0, maximum=10.0, rng=random.Random(7))
    delays = [b.next() for _ in range(8)]
    for n, d in enumerate(delays[:4]):
        assert 0.8 * 2**n <= d <= 1.2 * 2**n
    assert all(8.0 <= d <= 10.0 for d in delays[4:])  # 16 capped to 10, jitter down only
    assert len(set(delays[:4])) == 4
    assert b.reset() == 8 and b.attempts == 0
    assert 5.0 <= b.next(retry_after=5.0) <= 5.0 * 1.0 + 1e-9  # longer than the 1 s backoff: honoured
    assert b.next(retry_after=1e6) == 10.0  # capped


def test_log_rate_limit():
    """First failure logged, then at most one a minute, saying how many were held back."""
    r = RateLimit(interval=60.0)
    assert r.due(1000.0) == 0
    assert [r.due(1000.0 + t) for t in (1, 2, 59)] == [None, None, None]
    assert r.due(1060.5) == 3
    assert r.due(1061.0) is None
    assert r.due(1062.0, first=True) == 1  # a new streak is always logged


def test_retryable_statuses():
    assert all(retryable(s) for s in (401, 403, 408, 429, 500, 502, 503, 504, 301, 307))
    assert not any(retryable(s) for s in (400, 404, 405, 410, 413, 415, 422))


# -- TLS -----------------------------------------------------------------------------------------


def _require_openssl() -> str:
    path = shutil.which("openssl")
    if path is None:
        reason = "the openssl CLI is not installed (apt-get install openssl)"
        if os.environ.get("FSNOTIFYD_REQUIRE_KERNEL") == "1":
            pytest.fail(f"FSNOTIFYD_REQUIRE_KERNEL=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    return path


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, str]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it."""
    openssl = _require_openssl()
    d = tmp_path / "pki"
    d.mkdir()

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True, timeout=60)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=fsnotifyd test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    )
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    return {"ca": str(d / "ca.pem"), "cert": str(d / "server.pem"), "key": str(d / "server.key")}


def test_tls_with_private_ca(h, pki):
    ep = h.endpoint(tls=(pki["cert"], pki["key"]))
    sink = h.sink(ep.url, ca_file=pki["ca"])
    ev = event(0)
    sink.publish(ev)
    assert ep.wait_delivered(1) == [ev.id]
    check_cloudevent(ep.delivered()[0], ev)


def test_tls_unknown_ca_is_not_delivered(h, pki):
    """Verification on, the system CAs only: the handshake fails, the event stays spooled and
    is retried, and the error says it is the certificate."""
    ep = h.endpoint(tls=(pki["cert"], pki["key"]))
    sink = h.sink(ep.url, tls_verify=True)
    sink.publish(event(0))
    wait_until(lambda: sink.status()["retried"] >= 3, what="failed TLS attempts")
    st = sink.status()
    assert "certificate" in st["last_error"].lower()
    assert st["delivered"] == 0 and st["spooled_events"] == 1 and st["rejected"] == 0
    assert ep.delivered() == []


def test_tls_verify_off(h, pki):
    ep = h.endpoint(tls=(pki["cert"], pki["key"]))
    sink = h.sink(ep.url, tls_verify=False)
    ev = event(0)
    sink.publish(ev)
    assert ep.wait_delivered(1) == [ev.id]


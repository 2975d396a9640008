"""Events to an HTTP endpoint as CloudEvents 1.0 (structured JSON mode), at least once, in order.

Why a spool and a thread: ``publish`` runs on the daemon's event loop and must never wait for
the network, and an endpoint that is down (for seconds or for hours, across daemon restarts)
must still get every event, in order. So ``publish`` serialises the CloudEvent and appends it
to a persistent spool (:mod:`fsnotifyd.sinks.spool`); ONE sender thread POSTs the spool's head
over a kept-alive connection and only takes the next event once the endpoint answered 2xx and
the spool's cursor was moved past it. The bytes POSTed are the bytes spooled, so every retry and
every resend after a restart carries the same CloudEvents ``id`` (the fsnotifyd event id):
receivers dedupe on ``source`` + ``id``.

Why memory too: the spool is under the state directory, whose disk may be full, read-only or
failing exactly when the host's filesystems are. Then the events are kept in a bounded queue in
memory behind the spool, delivered from there in order (:mod:`fsnotifyd.sinks.backlog`), and
written back to the spool once the disk takes writes again (the sender tries every
``SPILL_INTERVAL_S``). Memory holds at most ``spool_max_bytes / MEMORY_FRACTION`` (a quarter,
16 MiB by default: it is RAM, on a host already in trouble); past it the oldest held events are
dropped and counted. The disk refusing is said once (``webhook.spool_failing``, errno and path)
and its end once (``webhook.spool_recovered``: how many were held, spilled, and delivered from
memory meanwhile); the spool directory is one of the daemon's own files in its
:class:`~fsnotifyd.statefile.FileHealth` (status, ``fsnotifyd_state_write_failing``). Events
still only in memory at :meth:`WebhookSink.close`, after a last try to spill them, are lost:
counted and said once (``webhook.unsaved``).

Delivery is at least once. The one window for a duplicate: the daemon is killed hard between
the endpoint's 2xx and the cursor write (or the cursor was lost, see the spool); the event is
then sent again at the next start with the same id.

Answers:

- 2xx: delivered.
- 408, 429, 5xx, 3xx (not followed: the URL needs fixing), 401 and 403 (a credential an operator
  will fix), no answer (refused, reset, timeout, TLS failure): the SAME event is retried, with
  exponential backoff from ``retry_initial_s`` doubling to ``retry_max_s``, ±20 % jitter, and at
  least a numeric ``Retry-After`` (capped at ``retry_max_s``). Logged at the first failure of a
  streak, then at most once a minute, and ``webhook.recovered`` when it ends.
- any other 4xx: the endpoint refuses this event for good. It is written to ``rejected.jsonl``
  in the spool directory (with the status and the start of the answer), counted, logged, and the
  next event goes. ``rejected.jsonl`` is rotated to ``rejected.jsonl.1`` past ``spool_max_bytes``.

Past ``spool_max_bytes`` the oldest undelivered events are dropped and counted
(``fsnotifyd_events_lost_total{source="webhook:NAME",reason="spool_full"}``); lines of the spool
that cannot be read count as ``reason="spool_corrupt"``, events dropped past memory's bound as
``reason="memory_full"``, those only in memory at stop as ``reason="not_saved"``. Nothing is
dropped without a count. (An event a bound drops while its POST is in flight may still arrive:
it is then counted lost and delivered, never neither.)

Only the URL's origin (scheme, host, port) is logged or shown in the status: paths and queries
of webhook URLs often hold secrets.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import random
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog

from ..config import WebhookConfig
from ..errors import ConfigError
from ..events import Event, KindFilter, hostname, rfc3339
from ..metrics import Metrics
from ..sinkvalues import webhook_url
from ..statefile import FileHealth, FileState
from ..version import __version__
from .backlog import Backlog, Item

log = structlog.get_logger("fsnotifyd")

CONTENT_TYPE = "application/cloudevents+json; charset=utf-8"
USER_AGENT = f"fsnotifyd/{__version__}"  # product/version (RFC 9110), so the endpoint sees which daemon posts
REJECTED = "rejected.jsonl"
LOG_INTERVAL_S = 60.0
MAX_RESPONSE_BYTES = 64 << 10  # more than this and the connection is dropped rather than drained
SNIPPET_BYTES = 512
JITTER = 0.2
MEMORY_FRACTION = 4  # memory holds at most spool_max_bytes / this while the disk refuses the spool
SPILL_INTERVAL_S = 1.0  # how often the sender tries to move memory back to the disk

_RETRY_STATUSES = frozenset({401, 403, 408, 429})


def cloudevent(event: Event, host: str) -> dict[str, Any]:
    """The CloudEvents 1.0 structured-mode envelope of one event."""
    ce: dict[str, Any] = {
        "specversion": "1.0",
        "id": event.id,
        "source": f"fsnotifyd://{host}",
        "type": f"io.fsnotifyd.{event.kind}",
    }
    subject = event.ve or (event.device.name if event.device is not None else None)
    if subject:
        ce["subject"] = subject
    ce["time"] = rfc3339(event.time)
    ce["datacontenttype"] = "application/json"
    ce["severity"] = event.severity
    ce["data"] = event.to_dict()
    return ce


def encode(event: Event, host: str) -> bytes:
    # ASCII JSON: kernel text may hold undecodable bytes (surrogate escapes) that UTF-8 cannot carry.
    return json.dumps(cloudevent(event, host), separators=(",", ":"), default=str).encode("ascii")


def retryable(status: int) -> bool:
    """Whether an HTTP answer means "try this event again later" (see the module docstring)."""
    return status in _RETRY_STATUSES or status >= 500 or 300 <= status < 400


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one POST came to: ``status`` None when there was no HTTP answer."""

    status: int | None
    error: str | None = None
    retry_after: float | None = None
    snippet: str = ""

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def rejected(self) -> bool:
        return self.status is not None and not self.delivered and not retryable(self.status)

    def describe(self) -> str:
        if self.status is None:
            return self.error or "no answer"
        text = f"HTTP {self.status}"
        return f"{text}: {self.snippet[:200]}" if self.snippet else text


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with jitter; ``attempts`` counts the failures of the current streak."""

    initial: float
    maximum: float
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0

    def next(self, retry_after: float | None = None) -> float:
        self.attempts += 1
        base = min(self.maximum, self.initial * 2.0 ** min(self.attempts - 1, 60))
        delay = min(self.maximum, base * self.rng.uniform(1 - JITTER, 1 + JITTER))
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.maximum))
        return delay

    def reset(self) -> int:
        attempts, self.attempts = self.attempts, 0
        return attempts


@dataclass(slots=True)
class RateLimit:
    """At most one log line per ``interval``; ``due`` says how many were held back since."""

    interval: float = LOG_INTERVAL_S
    last: float | None = None
    held: int = 0

    def due(self, now: float, first: bool = False) -> int | None:
        if first or self.last is None or now - self.last >= self.interval:
            held, self.held, self.last = self.held, 0, now
            return held
        self.held += 1
        return None


@dataclass(slots=True)
class WebhookStats:
    delivered: int = 0
    retried: int = 0
    rejected: int = 0
    filtered: int = 0
    lost: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None
    last_error_time: float | None = None
    last_success: float | None = None
    next_retry: float | None = None
    failing_since: float | None = None


class WebhookSink:
    """Publishes events to one webhook; see the module docstring."""

    def __init__(self, cfg: WebhookConfig, spool_dir: str, metrics: Metrics | None = None,
                 host: str | None = None, health: FileHealth | None = None) -> None:
        self.cfg = cfg
        self.name = f"webhook:{cfg.name}"
        self.spool_dir = spool_dir
        self.metrics = metrics
        self.host = host or hostname()
        try:
            parts = webhook_url(cfg.url)
        except ValueError as e:
            raise ConfigError(str(e), field=f"webhook {cfg.name}: url") from None
        port = parts.port
        assert parts.hostname is not None  # webhook_url refuses a URL without one
        self._https = parts.scheme == "https"
        self._address = (parts.hostname, port or (443 if self._https else 80))
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        netloc = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        self.origin = f"{parts.scheme}://{netloc}" + (f":{port}" if port else "")
        self._kinds = KindFilter.parse(cfg.kinds)
        self.stats = WebhookStats()
        self._backoff = Backoff(cfg.retry_initial_s, cfg.retry_max_s)
        self._retry_log = RateLimit()
        self._reject_log = RateLimit()
        self._full_log = RateLimit()
        self._memory_log = RateLimit()
        self._health = health if health is not None else FileHealth()
        self._streak_base = (0, 0, 0)  # the backlog's held, spilled, sent_from_memory when the disk began refusing
        self._last_spill = 0.0
        self._headers: dict[str, str] = {"Content-Type": CONTENT_TYPE, "User-Agent": USER_AGENT}
        self._ssl: ssl.SSLContext | None = None
        self._backlog: Backlog | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._conn: http.client.HTTPConnection | None = None
        self._conn_used = False

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Read the token, open the spool (resuming what an earlier run left) and start sending."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name} already started")
        if self.cfg.token_file:
            self._headers["Authorization"] = f"Bearer {self._read_token(self.cfg.token_file)}"
        if self._https:
            self._ssl = self._ssl_context()
        self._health.watch(self.spool_dir)
        self._backlog = Backlog(self.spool_dir, self.cfg.spool_max_bytes, self.memory_max_bytes, on_lost=self._lost,
                                on_refused=self._spool_refused, on_landed=self._spool_landed)
        self._bind_gauges()
        log.info("webhook.started", sink=self.name, url=self.origin, spooled=self._backlog.spool_events,
                 spool=self.spool_dir)
        self._thread = threading.Thread(target=self._run, name=f"fsnotifyd-{self.name}", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the sender (a backoff wait ends at once; a POST in flight gets half of
        ``timeout`` to finish, then its socket is shut), keep what is undelivered on disk and
        fsync the cursor. What the disk still refuses is lost with the memory queue: said once."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join(timeout / 2)
            if thread.is_alive():
                self._abort_connection()
                thread.join(timeout / 2)
            if thread.is_alive():
                log.warning("webhook.close_timeout", sink=self.name, timeout=timeout,
                            hint="the event in flight will be sent again at the next start")
        backlog = self._backlog
        if backlog is not None and not backlog.closed:
            unsaved = backlog.close()
            if unsaved:
                failing = self._spool_state()
                log.error("webhook.unsaved", sink=self.name, url=self.origin, count=unsaved, path=self.spool_dir,
                          errno=failing.errno if failing else None,
                          hint="these events were only in memory: the disk refused the spool; they are lost "
                               "to this webhook (counted, reason not_saved)")
            log.info("webhook.stopped", sink=self.name, spooled=backlog.spool_events)

    # -- publishing (event loop) -------------------------------------------------------------
    def wants(self, event: Event) -> bool:
        return self._kinds(event.kind)

    @property
    def memory_max_bytes(self) -> int:
        return self.cfg.spool_max_bytes // MEMORY_FRACTION

    def publish(self, event: Event) -> None:
        """Spool the event (or hold it in memory while the disk refuses the spool) and wake
        the sender; never waits for the network."""
        if not self.wants(event):
            self.stats.filtered += 1
            return
        if self._backlog is None:
            raise RuntimeError(f"{self.name}: publish before start()")
        self._backlog.append(encode(event, self.host))  # raises SpoolClosed after close()
        with self._cond:
            self._cond.notify()

    # -- status ------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        s = self.stats
        backlog = self._backlog
        failing = self._spool_state()
        return {
            "url": self.origin,
            "running": self._thread is not None and self._thread.is_alive(),
            "spooled_events": backlog.spool_events if backlog else 0,
            "spool_bytes": backlog.spool_bytes if backlog else 0,
            "memory_events": backlog.memory_events if backlog else 0,
            "memory_bytes": backlog.memory_bytes if backlog else 0,
            "spool_failing": failing is not None,
            "spool_errno": failing.errno if failing else None,
            "oldest_seconds": self._oldest_seconds(),
            "delivered": s.delivered,
            "retried": s.retried,
            "rejected": s.rejected,
            "filtered": s.filtered,
            "lost": dict(s.lost),
            "last_error": s.last_error,
            "last_error_time": _when(s.last_error_time),
            "last_success": _when(s.last_success),
            "next_retry": _when(s.next_retry),
            "failing_since": _when(s.failing_since),
        }

    # -- the sender thread -------------------------------------------------------------------
    def _run(self) -> None:
        backlog = self._backlog
        assert backlog is not None
        try:
            while not self._stopping:
                try:
                    with self._cond:
                        # Woken on its own while the spool is not open: to try opening it again.
                        self._cond.wait_for(lambda: self._stopping or backlog.events > 0,
                                            timeout=None if backlog.spool_open else SPILL_INTERVAL_S)
                    if self._stopping:
                        break
                    self._maybe_spill()
                    item = backlog.peek()
                    if item is not None:
                        self._deliver(backlog, item)
                except Exception as e:  # noqa: BLE001 - the sender must outlive any one bad event
                    # A bug or a spool the disk refuses to read: back off like an outage, never spin.
                    delay = self._backoff.next()
                    self.stats.last_error, self.stats.last_error_time = f"internal: {e!r}", time.time()
                    if self._retry_log.due(time.monotonic(), first=self._backoff.attempts == 1) is not None:
                        log.exception("webhook.sender_error", sink=self.name, error=repr(e), retry_in=round(delay, 3))
                    self._wait(delay)
        finally:
            self._close_connection()

    def _deliver(self, backlog: Backlog, record: Item) -> None:
        """Try ``record`` until it is delivered or rejected, the sink stops, or a bound drops it."""
        while True:
            attempt = self._post(record.data)
            if self._stopping and not attempt.delivered:
                return  # interrupted by close(): not the endpoint's failure
            now = time.time()
            if attempt.delivered:
                backlog.ack(record)
                self._on_delivered(now)
                return
            if attempt.rejected:
                try:
                    self._dead_letter(record, attempt, now)
                except OSError as e:
                    # Not acknowledged, so not lost: it stays the head and is tried again.
                    attempt = Attempt(None, error=f"HTTP {attempt.status}, and the dead-letter file cannot be "
                                                  f"written: {e}")
                else:
                    backlog.ack(record)
                    return
            delay = self._backoff.next(attempt.retry_after)
            self._on_retry(record, attempt, now, delay)
            if self._wait(delay) or not backlog.is_head(record):
                return

    def _wait(self, delay: float) -> bool:
        """Sleep ``delay`` unless the sink stops first; True if it is stopping. While memory
        holds events the sleep is cut in slices, to spill them to the disk in between: an
        endpoint down for long must not keep them from the disk that far (nor from a restart)."""
        deadline = time.monotonic() + delay
        while True:
            left = deadline - time.monotonic()
            backlog = self._backlog
            spilling = backlog is not None and (backlog.memory_events > 0 or not backlog.spool_open)
            step = min(left, SPILL_INTERVAL_S) if spilling else left
            with self._cond:
                if self._cond.wait_for(lambda: self._stopping, timeout=max(0.0, step)):
                    return True
            if step >= left:
                return False
            self._maybe_spill()

    def _maybe_spill(self) -> None:
        """Back to the disk, at most once per SPILL_INTERVAL_S (each try costs a refused write)."""
        backlog = self._backlog
        if backlog is None or (backlog.memory_events == 0 and backlog.spool_open):
            return
        now = time.monotonic()
        if now - self._last_spill < SPILL_INTERVAL_S:
            return
        self._last_spill = now
        backlog.spill()

    # -- outcomes ----------------------------------------------------------------------------
    def _on_delivered(self, now: float) -> None:
        s = self.stats
        s.delivered += 1
        s.last_success, s.next_retry = now, None
        self._count("delivered")
        attempts = self._backoff.reset()
        if attempts:
            log.info("webhook.recovered", sink=self.name, url=self.origin, attempts=attempts,
                     down_s=round(now - (s.failing_since or now), 3))
            s.failing_since = None
            self._retry_log = RateLimit()

    def _on_retry(self, record: Item, attempt: Attempt, now: float, delay: float) -> None:
        s = self.stats
        s.retried += 1
        s.last_error, s.last_error_time = attempt.describe(), now
        s.next_retry = now + delay
        if s.failing_since is None:
            s.failing_since = now
        self._count("retried")
        held = self._retry_log.due(time.monotonic(), first=self._backoff.attempts == 1)
        if held is not None:
            log.warning("webhook.retry", sink=self.name, url=self.origin, status=attempt.status,
                        error=attempt.error or attempt.snippet[:200] or None, retry_in=round(delay, 3),
                        attempts=self._backoff.attempts, event_id=_event_id(record),
                        spooled=self._backlog.events if self._backlog else 0)

    def _dead_letter(self, record: Item, attempt: Attempt, now: float) -> None:
        head = json.dumps({"rejected_at": rfc3339(now), "status": attempt.status, "response": attempt.snippet})
        line = head[:-1].encode() + b',"event":' + record.data + b"}\n"  # the spooled bytes, as sent
        path = os.path.join(self.spool_dir, REJECTED)
        try:
            if os.path.getsize(path) + len(line) > self.cfg.spool_max_bytes:
                os.replace(path, path + ".1")  # bounded like the spool; one old file kept
        except FileNotFoundError:
            pass
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.write(fd, line) != len(line):
                raise OSError(errno.ENOSPC, "short write")
        finally:
            os.close(fd)
        s = self.stats
        s.rejected += 1
        s.last_error, s.last_error_time = attempt.describe(), now
        self._count("rejected")
        if self._backoff.reset():  # the endpoint answers: whatever streak there was is over
            self._retry_log = RateLimit()
        s.failing_since, s.next_retry = None, None
        held = self._reject_log.due(time.monotonic())
        if held is not None:
            log.error("webhook.rejected", sink=self.name, url=self.origin, status=attempt.status,
                      response=attempt.snippet[:200], event_id=_event_id(record), dead_letter=path,
                      rejected_since_last_log=held + 1, rejected_total=s.rejected)

    def _lost(self, reason: str, count: int) -> None:
        # Runs under the backlog's or the spool's lock (from publish or the sender): no calls to them here.
        self.stats.lost[reason] = self.stats.lost.get(reason, 0) + count
        if self.metrics is not None:
            self.metrics.lost.labels(self.name, reason).inc(count)
        if reason == "spool_full":
            held = self._full_log.due(time.monotonic())
            if held is not None:
                log.warning("webhook.spool_full", sink=self.name, url=self.origin, dropped=count,
                            dropped_total=self.stats.lost[reason], max_bytes=self.cfg.spool_max_bytes,
                            hint="the endpoint has been unreachable too long; the oldest events were dropped")
        elif reason == "memory_full":
            held = self._memory_log.due(time.monotonic())
            if held is not None:
                log.warning("webhook.memory_full", sink=self.name, url=self.origin, dropped=count,
                            dropped_total=self.stats.lost[reason], max_bytes=self.memory_max_bytes,
                            hint="the disk refuses the spool and the endpoint does not take events as fast "
                                 "as they come; the oldest held in memory were dropped")

    # -- the disk refusing the spool (callbacks under the backlog's lock) --------------------
    def _spool_refused(self, error: OSError) -> None:
        started = self._health.failed(self.spool_dir, error)
        if started is None:
            return  # this streak was said already
        backlog = self._backlog  # None while the backlog is being opened
        self._streak_base = (backlog.held, backlog.spilled, backlog.sent_from_memory) if backlog else (0, 0, 0)
        log.error("webhook.spool_failing", sink=self.name, url=self.origin, path=self.spool_dir,
                  errno=started.errno, error=started.error, memory_max_bytes=self.memory_max_bytes,
                  hint="events are kept in memory, delivered from there in order, and written to the spool "
                       "again once the disk takes them; a stop meanwhile loses those still in memory")

    def _spool_landed(self) -> None:
        ended = self._health.written(self.spool_dir)
        backlog = self._backlog
        if ended is None or backlog is None:
            return
        counts = (backlog.held, backlog.spilled, backlog.sent_from_memory)
        held, spilled, sent = (now - base for now, base in zip(counts, self._streak_base, strict=True))
        log.info("webhook.spool_recovered", sink=self.name, url=self.origin, path=self.spool_dir, held=held,
                 spilled=spilled, delivered_from_memory=sent, refused=ended.refused,
                 failed_for_s=round(time.time() - (ended.since or time.time()), 1))

    def _spool_state(self) -> FileState | None:
        """The spool directory's failing streak, None while the disk takes it."""
        return next((f for f in self._health.files() if f.path == self.spool_dir and not f.ok), None)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.webhook_deliveries.labels(self.name, outcome).inc()

    # -- HTTP --------------------------------------------------------------------------------
    def _post(self, body: bytes) -> Attempt:
        attempt = self._post_once(body)
        if attempt.status is None and attempt.reused and not self._stopping:
            # Most likely a kept-alive connection the server closed while it was idle: no outage,
            # and the request was not read. Once more on a fresh connection before backing off
            # (should the server have read it after all, the same id lets it dedupe).
            attempt = self._post_once(body)
        return attempt.result

    def _post_once(self, body: bytes) -> _Try:
        conn = self._connection()
        reused = self._conn_used
        try:
            conn.request("POST", self._target, body=body, headers=self._headers)
            resp = conn.getresponse()
            data = resp.read(MAX_RESPONSE_BYTES)
            if not resp.isclosed():
                self._close_connection()  # an answer too long to drain: not worth keeping
            elif resp.will_close:
                self._close_connection()
            else:
                self._conn_used = True
        except (OSError, http.client.HTTPException, ValueError) as e:
            self._close_connection()
            return _Try(Attempt(None, error=_describe(e)), reused)
        return _Try(Attempt(resp.status, retry_after=_retry_after(resp.getheader("Retry-After")),
                            snippet=data[:SNIPPET_BYTES].decode("utf-8", "replace")), reused)

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            host, port = self._address
            if self._https:
                self._conn = http.client.HTTPSConnection(host, port, timeout=self.cfg.timeout_s, context=self._ssl)
            else:
                self._conn = http.client.HTTPConnection(host, port, timeout=self.cfg.timeout_s)
            self._conn_used = False
        return self._conn

    def _close_connection(self) -> None:
        conn, self._conn, self._conn_used = self._conn, None, False
        if conn is not None:
            conn.close()

    def _abort_connection(self) -> None:
        """From close(): wake a POST blocked on the network by shutting its socket."""
        conn = self._conn
        sock = getattr(conn, "sock", None) if conn is not None else None
        if sock is not None:
            try:
                # socket.socket's own shutdown: SSLSocket's would tear down TLS state under the reader.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def _ssl_context(self) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(cafile=self.cfg.ca_file)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"cannot load the CA file {self.cfg.ca_file}: {e}", file=self.cfg.ca_file,
                              field=f"webhook {self.cfg.name}: ca_file") from None
        if not self.cfg.tls_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def _read_token(self, path: str) -> str:
        field_name = f"webhook {self.cfg.name}: token_file"
        try:
            with open(path, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the bearer token file {path}: {e}", file=path, field=field_name) from None
        if not token:
            raise ConfigError(f"the bearer token file {path} is empty", file=path, field=field_name)
        if any(c.isspace() or not c.isprintable() or ord(c) > 126 for c in token):
            raise ConfigError(f"the bearer token in {path} holds spaces or non-ASCII characters", file=path,
                              field=field_name)
        return token

    # -- gauges ------------------------------------------------------------------------------
    def _bind_gauges(self) -> None:
        if self.metrics is None:
            return
        backlog = self._backlog
        assert backlog is not None
        # Read at scrape time: always current, nothing to keep in step on every event.
        self.metrics.webhook_spool_events.labels(self.name).set_function(lambda: backlog.spool_events)
        self.metrics.webhook_spool_bytes.labels(self.name).set_function(lambda: backlog.spool_bytes)
        self.metrics.webhook_memory_events.labels(self.name).set_function(lambda: backlog.memory_events)
        self.metrics.webhook_memory_bytes.labels(self.name).set_function(lambda: backlog.memory_bytes)
        self.metrics.webhook_oldest_seconds.labels(self.name).set_function(self._oldest_seconds)

    def _oldest_seconds(self) -> float:
        backlog = self._backlog
        if backlog is None:
            return 0.0
        record = backlog.peek()  # the spool's head, or memory's: the oldest undelivered either way
        if record is None or not isinstance(record.value, dict):
            return 0.0
        try:
            t = datetime.fromisoformat(str(record.value.get("time"))).timestamp()
        except ValueError:
            return 0.0
        return max(0.0, time.time() - t)


@dataclass(frozen=True, slots=True)
class _Try:
    result: Attempt
    reused: bool

    @property
    def status(self) -> int | None:
        return self.result.status


def _describe(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {e.verify_message or e}"
    if isinstance(e, socket.timeout):
        return "timed out"
    text = str(e) or type(e).__name__
    return text if type(e).__name__ in text else f"{type(e).__name__}: {text}"


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None  # an HTTP date: not honoured (clocks differ); the backoff applies
    return seconds if seconds >= 0 and seconds == seconds else None


def _event_id(record: Item) -> str | None:
    return record.value.get("id") if isinstance(record.value, dict) else None


def _when(t: float | None) -> str | None:
    return None if t is None else rfc3339(t)

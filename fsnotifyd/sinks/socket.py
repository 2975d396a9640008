"""The control socket: live event streams for subscribers, status, and a few operator requests.

Protocol: the client sends one JSON object on one line, the server answers with JSON lines.
``{"op": "tail", "kinds": [...], "ves": [...]}`` is acknowledged with ``{"ok": true, "version": V}``
(the daemon's version: the one line where the stream says who sends it) once the
subscription is in place (so a client knows that nothing published from then on is missed),
then every matching event follows, one per line. ``{"op": "status"}`` answers one line, and so
do the operations the daemon adds (``reload``, ``release``).

Who may ask: the socket is ``root:<group>`` mode 0660, and since a file mode is only the first
gate (a process with CAP_DAC_OVERRIDE, or a socket inherited across a privilege drop, passes
it), every connection's peer credentials are checked too: root, or a process whose primary or
supplementary groups (``SO_PEERGROUPS``, taken at connect time, so no /proc race) include the
group. Requests are size limited, validated key by key, and a client that sends garbage gets an
error line; none of it can stop the daemon. A subscriber that stops reading is cut off when its
buffer passes ``max_buffer`` bytes, and the cut is counted; it never slows the daemon down.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from ..events import Event, KindFilter
from ..version import __version__

log = structlog.get_logger("fsnotifyd")

MAX_REQUEST = 64 * 1024
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13; Python's module may not name it
REQUEST_TIMEOUT_S = 10.0

Handler = Callable[[dict[str, Any]], "dict[str, Any] | Awaitable[dict[str, Any]]"]


class BadRequest(ValueError):
    """The request is malformed; the message says which field and why."""


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)  # 256 groups: Python caps buflen
        groups = struct.unpack(f"{len(raw) // 4}I", raw)
    except OSError:
        groups = ()  # an old kernel: the primary group still counts
    return Peer(pid, uid, gid, tuple(groups))


# op -> allowed keys and their checks. A key the op does not know is an error: a misspelt
# filter silently ignored would tail everything.
def _strings(name: str, value: Any, limit: int = 64) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) and 0 < len(x) <= 128 for x in value):
        raise BadRequest(f"{name} must be a list of non-empty strings (at most 128 characters each)")
    if len(value) > limit:
        raise BadRequest(f"{name} has {len(value)} entries; at most {limit}")
    return value


def _kinds(value: Any) -> KindFilter:
    try:
        return KindFilter.parse(_strings("kinds", value))
    except ValueError as e:
        raise BadRequest(f"kinds: {e}") from None


def _ve_id(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        raise BadRequest("ve must be a VE id (a non-empty string of at most 64 characters)")
    return value


FIELDS: dict[str, dict[str, Callable[[Any], Any]]] = {
    "status": {},
    "tail": {"kinds": _kinds, "ves": lambda v: _strings("ves", v, 1024)},
    "reload": {},
    "release": {"ve": _ve_id},
}
REQUIRED = {"release": ("ve",)}


def validate(req: Any, known_ops: tuple[str, ...]) -> dict[str, Any]:
    """The request as a checked dict, or BadRequest naming what is wrong."""
    if not isinstance(req, dict):
        raise BadRequest("request must be a JSON object on one line")
    op = req.get("op")
    if not isinstance(op, str) or op not in known_ops:
        raise BadRequest(f"unknown op {op!r}; expected one of {', '.join(known_ops)}")
    fields = FIELDS.get(op, {})
    for key, value in req.items():
        if key == "op":
            continue
        if key not in fields:
            allowed = ", ".join(fields) or "no other keys"
            raise BadRequest(f"op {op!r} takes {allowed}; got {key!r}")
        req[key] = fields[key](value)
    for key in REQUIRED.get(op, ()):
        if key not in req:
            raise BadRequest(f"op {op!r} needs {key!r}")
    return req


_TAIL_ACK = (json.dumps({"ok": True, "version": __version__}) + "\n").encode()


@dataclass
class _Subscriber:
    writer: asyncio.StreamWriter
    kinds: KindFilter
    ves: frozenset[str]

    def wants(self, event: Event) -> bool:
        return self.kinds(event.kind) and (not self.ves or event.ve in self.ves)


@dataclass
class SocketSink:
    path: str
    status: Callable[[], dict[str, Any]] = dict
    # Further request kinds ("reload", "release"): op -> handler(request) -> reply fields
    # (a coroutine function for work that must not hold the event loop).
    ops: dict[str, Handler] = field(default_factory=dict)
    gid: int = 0  # the group allowed besides root
    max_request: int = MAX_REQUEST
    max_clients: int = 64
    max_buffer: int = 8 << 20
    mode: int = 0o660
    name: str = "socket"
    # Called with (op, result) for every request: result ok, error, refused, busy or bad.
    count: Callable[[str, str], None] = lambda op, result: None
    dropped_subscribers: int = 0
    refused: int = 0
    busy: int = 0  # turned away: max_clients reached
    _subs: list[_Subscriber] = field(default_factory=list)
    _clients: int = 0
    _server: asyncio.AbstractServer | None = None
    _last_refusal_log: float = 0.0

    async def start(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, mode=0o755, exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)  # a stale socket from a killed daemon
        # Created under a umask that leaves no window in which others could connect.
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=self.path, limit=self.max_request)
        finally:
            os.umask(old)
        if os.geteuid() == 0:
            os.chown(self.path, 0, self.gid)
        os.chmod(self.path, self.mode)

    def allowed(self, peer: Peer) -> bool:
        return peer.uid == 0 or peer.gid == self.gid or self.gid in peer.groups

    def publish(self, event: Event) -> None:
        if not self._subs:
            return
        line: bytes | None = None
        for sub in list(self._subs):
            if not sub.wants(event):
                continue
            if line is None:
                line = (event.to_json() + "\n").encode()
            if sub.writer.transport.get_write_buffer_size() > self.max_buffer:
                self.dropped_subscribers += 1
                self._drop(sub)
                continue
            sub.writer.write(line)

    def _drop(self, sub: _Subscriber) -> None:
        if sub in self._subs:
            self._subs.remove(sub)
        sub.writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients += 1
        try:
            await self._serve_one(reader, writer)
        except (ConnectionError, BrokenPipeError):
            pass  # the client left; nothing to answer
        except Exception as e:  # noqa: BLE001 - one request's bug must not leave its client hanging
            log.exception("control.failed")
            with contextlib.suppress(Exception):
                await self._reply(writer, {"ok": False, "error": f"internal error: {e!r}"})
        finally:
            self._clients -= 1

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = peer_of(writer.get_extra_info("socket"))
        if not self.allowed(peer):
            self.refused += 1
            self.count("-", "refused")
            now = time.monotonic()
            if now - self._last_refusal_log > 10:  # a local user looping must not flood the log
                self._last_refusal_log = now
                log.warning("control.refused", pid=peer.pid, uid=peer.uid, gid=peer.gid, refused_total=self.refused)
            await self._unread(reader)
            await self._reply(writer, {"ok": False, "error": f"permission denied: uid {peer.uid} is not root "
                                                             f"and not in group {self.gid}"})
            return
        if self._clients > self.max_clients:
            self.busy += 1
            self.count("-", "busy")
            await self._unread(reader)
            await self._reply(writer, {"ok": False, "error": f"too many clients (at most {self.max_clients})"})
            return
        try:
            raw = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT_S)
            if len(raw) > self.max_request:
                raise BadRequest(f"request larger than {self.max_request} bytes")
            if not raw.endswith(b"\n") and raw:
                raise BadRequest("request must end with a newline")
            req = validate(json.loads(raw) if raw.strip() else None, ("status", "tail", *self.ops))
        except (ValueError, asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError) as e:
            # readline() raises ValueError when the line passes the stream limit.
            msg = str(e)
            if isinstance(e, asyncio.LimitOverrunError) or "limit" in msg:
                msg = f"request larger than {self.max_request} bytes"
            elif isinstance(e, TimeoutError):
                msg = f"no complete request line within {REQUEST_TIMEOUT_S:.0f} s"
            elif isinstance(e, json.JSONDecodeError):
                msg = f"not JSON: {e.msg} at character {e.pos}"
            self.count("-", "bad")
            await self._reply(writer, {"ok": False, "error": f"bad request: {msg}"})
            return
        op = req["op"]
        if op == "status":
            self.count(op, "ok")
            await self._reply(writer, {"ok": True, "version": __version__, **self.status()})
        elif op == "tail":
            sub = _Subscriber(writer, req.get("kinds") or KindFilter(), frozenset(req.get("ves") or []))
            self._subs.append(sub)
            self.count(op, "ok")
            writer.write(_TAIL_ACK)
            try:
                await reader.read()  # the client closing its end ends the subscription
            finally:
                self._drop(sub)
        else:
            try:
                reply = self.ops[op](req)
                if inspect.isawaitable(reply):
                    reply = await reply
            except Exception as e:  # noqa: BLE001 - a failing request must not take the daemon down
                log.exception("control.failed", op=op)
                reply = {"ok": False, "error": f"{op} failed: {e}"}
            self.count(op, "ok" if reply.get("ok") else "error")
            await self._reply(writer, reply)

    @staticmethod
    async def _unread(reader: asyncio.StreamReader) -> None:
        """Take in what the client sent before refusing it: closing a unix socket with unread
        data resets it, and the client could lose the answer (seen as "Connection lost" under
        load). Bounded: a request line, for a moment."""
        with contextlib.suppress(ValueError, asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError,
                                 ConnectionError):
            await asyncio.wait_for(reader.readline(), 0.5)

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
        writer.write((json.dumps(obj, default=str) + "\n").encode())
        try:
            await writer.drain()
        finally:
            writer.close()

    def close(self) -> None:
        for sub in list(self._subs):
            self._drop(sub)
        if self._server is not None:
            self._server.close()
            self._server = None
        try:
            os.unlink(self.path)
        except OSError:
            pass

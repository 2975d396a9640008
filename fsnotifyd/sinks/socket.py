"""The unix socket: live event streams for subscribers, and status on request.

Protocol: the client sends one JSON line, the server answers with JSON lines.
``{"op": "tail", "kinds": [...], "ves": [...]}`` is acknowledged with ``{"ok": true}`` once the
subscription is in place (so a client knows that nothing published from then on is missed),
then every matching event follows, one per line. ``{"op": "status"}`` answers one line.
A subscriber that stops reading is cut off when its buffer passes ``max_buffer`` bytes, and the
cut is counted; it never slows the daemon down.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from ..events import Event

MAX_REQUEST = 64 * 1024


@dataclass
class _Subscriber:
    writer: asyncio.StreamWriter
    kinds: frozenset[str]
    ves: frozenset[str]

    def wants(self, event: Event) -> bool:
        if self.kinds and not any(
            event.kind == k or (k.endswith(".*") and event.kind.startswith(k[:-1])) for k in self.kinds
        ):
            return False
        return not self.ves or event.ve in self.ves


@dataclass
class SocketSink:
    path: str
    status: Callable[[], dict[str, Any]] = dict
    # Further request kinds ("reload"): op -> handler(request) -> reply fields.
    ops: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = field(default_factory=dict)
    max_buffer: int = 8 << 20
    mode: int = 0o660
    name: str = "socket"
    dropped_subscribers: int = 0
    _subs: list[_Subscriber] = field(default_factory=list)
    _server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)  # a stale socket from a killed daemon
        self._server = await asyncio.start_unix_server(self._serve, path=self.path, limit=MAX_REQUEST)
        os.chmod(self.path, self.mode)

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
        try:
            raw = await asyncio.wait_for(reader.readline(), 10)
            req = json.loads(raw) if raw.strip() else None
            if not isinstance(req, dict):
                raise ValueError("request must be a JSON object on one line")
        except (ValueError, asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError) as e:
            await self._reply(writer, {"ok": False, "error": f"bad request: {e}"})
            return
        op = req.get("op")
        if op == "status":
            await self._reply(writer, {"ok": True, **self.status()})
        elif op == "tail":
            kinds, ves = req.get("kinds") or [], req.get("ves") or []
            if not all(isinstance(x, str) for x in [*kinds, *ves]):
                await self._reply(writer, {"ok": False, "error": "kinds and ves must be lists of strings"})
                return
            sub = _Subscriber(writer, frozenset(kinds), frozenset(ves))
            self._subs.append(sub)
            writer.write(b'{"ok":true}\n')
            try:
                await reader.read()  # the client closing its end ends the subscription
            finally:
                self._drop(sub)
        elif op in self.ops:
            await self._reply(writer, self.ops[op](req))
        else:
            known = ", ".join(["status", "tail", *self.ops])
            await self._reply(writer, {"ok": False, "error": f"unknown op {op!r}; expected one of {known}"})

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

"""The client side of the daemon's control socket: one request and its reply, or a stream.

The daemon answers in :mod:`.control` (behind the socket sink's checks); the CLI commands
``status``, ``events tail``, ``record``, ``rules reload`` and ``ve release`` ask through here.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from typing import Any, TextIO


async def request(path: str, req: dict[str, Any]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(path, limit=16 << 20)
    writer.write((json.dumps(req) + "\n").encode())
    await writer.drain()
    return reader, writer


async def ask(path: str, op: str) -> dict[str, Any]:
    """One request to the daemon, one reply."""
    reader, writer = await request(path, {"op": op})
    line = await reader.readline()
    writer.close()
    reply: dict[str, Any] = json.loads(line)
    return reply


async def stream(path: str, req: dict[str, Any], out: TextIO, duration: float | None) -> int:
    """Write the subscription's event lines to ``out`` until it ends or ``duration`` passed."""
    reader, writer = await request(path, req)
    ack = json.loads(await reader.readline() or b"{}")
    if not ack.get("ok"):
        print(f"fsnotifyd: {ack.get('error', 'no answer from daemon')}", file=sys.stderr)
        return 1
    deadline = None if duration is None else time.monotonic() + duration
    try:
        while True:
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                break
            try:
                line = await asyncio.wait_for(reader.readline(), timeout)
            except TimeoutError:
                break
            if not line:
                break
            out.write(line.decode())
            out.flush()
    finally:
        writer.close()
    return 0


def ask_blocking(path: str, req: dict[str, Any], timeout: float = 600) -> dict[str, Any] | None:
    """One request without an event loop; None when no daemon answers there. The default
    timeout is long: a release may stop and start a VE (fsck included)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall((json.dumps(req) + "\n").encode())
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    if not data.strip():
        return {"ok": False, "error": "the daemon closed the connection"}
    reply: dict[str, Any] = json.loads(data)
    return reply

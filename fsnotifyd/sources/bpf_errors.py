"""Every ext4 error from the ``ext4:ext4_error`` tracepoint (``bpf/ext4_error.c``).

kmsg loses errors to ext4's printk rate limit and fanotify coalesces unread ones; the
tracepoint fires for each error with the device, function and line, and (from BPF) the pid,
comm and cgroup of the task that hit it. Its observations carry source ``bpf`` and merge in
the correlator with the other views of the same error.

The ring buffer's map fd is pollable, so it is read from the event loop (``add_reader``), not a
thread. A full ring buffer is counted by the program and reported as ``events.lost``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from ..events import Device, Kernel, Observation
from ..typing import Ready, Send
from . import bpfload

log = structlog.get_logger("fsnotifyd.bpf")

SOURCE = "bpf"
MINORBITS = 20


def kernel_dev(dev: int) -> Device:
    return Device(dev >> MINORBITS, dev & ((1 << MINORBITS) - 1), None)


class BpfErrorsSource:
    name = "bpf_errors"

    def __init__(self, lost_interval: float = 1.0) -> None:
        self.lost_interval = lost_interval
        self.prog: bpfload.Loaded | None = None
        self.errors = 0
        self.lost = 0
        # bpf_ktime_get_ns is CLOCK_MONOTONIC, like time.monotonic(): one offset makes it wall time
        self._wall_offset = time.time() - time.monotonic()

    def status(self) -> dict[str, Any]:
        p = self.prog
        return {"program": "ext4_error", "load_s": round(p.load_seconds, 3) if p else None,
                "errors": self.errors, "lost": self.lost}

    def observe(self, ev: Any, now_wall: float | None = None) -> Observation:
        func = bytes(ev.function).split(b"\0", 1)[0].decode("ascii", "replace") or None
        comm = bytes(ev.comm).split(b"\0", 1)[0].decode("utf-8", "replace") or None
        t = ev.ts_ns / 1e9 + self._wall_offset if ev.ts_ns else (now_wall or time.time())
        return Observation(
            source=SOURCE, kind="fs.error", time=t, device=kernel_dev(ev.dev), fs="ext4",
            kernel=Kernel(function=func, line=ev.line or None, comm=comm, pid=ev.pid or None),
            details={"cgroup_id": ev.cgroup_id},
        )

    async def run(self, send: Send, ready: Ready) -> None:
        loop = asyncio.get_running_loop()
        self.prog = await asyncio.to_thread(bpfload.load, "ext4_error")
        table = self.prog["errors"]
        ring = self.prog.ring_buffer("errors")

        def on_record(buf: Any, offset: int, size: int) -> None:
            try:
                obs = self.observe(table.event(buf, offset))
            except Exception:  # noqa: BLE001 - one odd record must not stop the reader
                log.exception("bpf.decode_failed", program="ext4_error", size=size)
                return
            self.errors += 1
            send(obs)

        def consume() -> None:
            ring.consume(on_record)

        fd = table.map_fd
        loop.add_reader(fd, consume)
        try:
            ready()
            while True:
                await asyncio.sleep(self.lost_interval)
                consume()  # the poll is level-triggered; this only covers a missed wake-up
                total = int(self.prog["lost"].sum(0).value)
                if total > self.lost:
                    send(Observation(source=SOURCE, kind="events.lost", time=time.time(), count=total - self.lost,
                                     details={"reason": "bpf_ringbuf_full", "program": "ext4_error"}))
                    self.lost = total
        finally:
            loop.remove_reader(fd)
            self.prog.close()

"""The systemd notification protocol (``sd_notify(3)``), spoken without libsystemd.

Under ``Type=notify`` systemd waits for ``READY=1`` before it counts the service as started,
shows ``STATUS=`` lines in ``systemctl status``, and with ``WatchdogSec=`` restarts the service
when ``WATCHDOG=1`` stops arriving. A reload is ``RELOADING=1`` before and ``READY=1`` after
(also after a failed one: the service runs on, with what it had). The protocol is one datagram
of ``KEY=VALUE`` lines to the unix socket named by ``$NOTIFY_SOCKET`` (``@`` means the abstract
namespace). Outside systemd the variable is unset and every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, MutableMapping

import structlog

log = structlog.get_logger("fsnotifyd")


class Notifier:
    def __init__(self, environ: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address: str | None = env.get("NOTIFY_SOCKET") or None
        usec = env.get("WATCHDOG_USEC")
        wpid = env.get("WATCHDOG_PID")
        # WATCHDOG_PID names the process meant to ping; a child that inherited the variables is not it.
        mine = wpid is None or wpid == str(os.getpid())
        self.watchdog_s: float | None = int(usec) / 1e6 if usec and usec.isdigit() and int(usec) > 0 and mine else None
        # Children (exporters, e2fsck) must not talk to systemd in the daemon's name.
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(key, None)
        self._sock: socket.socket | None = None
        self.failures = 0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, fields: Mapping[str, object]) -> bool:
        """Send one notification; False (logged once) when systemd cannot be reached."""
        if self.address is None:
            return False
        text = "\n".join(f"{k}={str(v).replace(chr(10), ' ')}" for k, v in fields.items())
        addr = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(text.encode(), addr)
            return True
        except OSError as e:
            self.failures += 1
            if self.failures == 1:
                log.warning("sdnotify.failed", socket=self.address, error=str(e))
            return False

    def ready(self, status: str) -> bool:
        return self.send({"READY": 1, "STATUS": status, "MAINPID": os.getpid()})

    def reloading(self) -> bool:
        # MONOTONIC_USEC tells systemd (>= 253, Type=notify-reload) which reload this is, so a
        # READY=1 of an earlier one cannot end it; older versions ignore the key.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send({"RELOADING": 1, "MONOTONIC_USEC": usec, "STATUS": "reloading rules"})

    def status(self, status: str) -> bool:
        return self.send({"STATUS": status})

    def watchdog(self) -> bool:
        return self.send({"WATCHDOG": 1})

    def stopping(self) -> bool:
        return self.send({"STOPPING": 1, "STATUS": "stopping"})

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

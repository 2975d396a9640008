"""The sd_notify client on its own: addresses, what it takes out of the environment."""

from __future__ import annotations

import os
import socket
import time

from fsnotifyd.app.sdnotify import Notifier


def test_sends_to_a_path_socket_and_clears_the_environment(tmp_path) -> None:
    path = str(tmp_path / "n.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(path)
        env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid()), "PATH": "/bin"}
        n = Notifier(env)
        assert env == {"PATH": "/bin"}  # children (exporters, e2fsck) must not inherit them
        assert n.enabled and n.watchdog_s == 30.0
        assert n.ready("9/9 sources up") and n.watchdog() and n.status("a\nb")
        got = [rx.recv(4096).decode() for _ in range(3)]
        n.close()
    assert got[0] == f"READY=1\nSTATUS=9/9 sources up\nMAINPID={os.getpid()}"
    assert got[1] == "WATCHDOG=1"
    assert got[2] == "STATUS=a b"  # a newline would start a new assignment


def test_abstract_socket_address() -> None:
    name = f"fsnd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind("\0" + name)
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.watchdog_s is None
        assert n.stopping()
        assert rx.recv(4096) == b"STOPPING=1\nSTATUS=stopping"
        n.close()


def test_watchdog_meant_for_another_pid_is_ignored_and_no_socket_is_a_no_op(tmp_path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "missing"), "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert n.watchdog_s is None
    assert n.ready("x") is False and n.failures == 1  # logged once, never raised
    off = Notifier({})
    assert not off.enabled and off.ready("x") is False


def test_reloading_carries_the_monotonic_clock(tmp_path) -> None:
    """systemd >= 253 (Type=notify-reload) needs MONOTONIC_USEC with RELOADING=1; it is
    CLOCK_MONOTONIC in microseconds, the clock systemd reads."""
    path = str(tmp_path / "n.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(path)
        n = Notifier({"NOTIFY_SOCKET": path})
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert n.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        fields = dict(line.split("=", 1) for line in rx.recv(4096).decode().splitlines())
        n.close()
    assert fields["RELOADING"] == "1" and fields["STATUS"] == "reloading rules"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after

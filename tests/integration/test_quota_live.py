"""QuotaSource on the real kernel's ``VFS_DQUOT`` generic netlink family, alone and in the daemon.

This kernel cannot produce a real quota warning: it has CONFIG_QUOTA and
CONFIG_QUOTA_NETLINK_INTERFACE (so the family and its ``events`` group exist) but no quota
format (CONFIG_QFMT_V1/V2 unset, no quota_v2 module; no XFS or tmpfs quota either). An ext4
made with ``-O quota`` is refused at mount ("The kernel was not built with CONFIG_QUOTA and
CONFIG_QFMT_V2"), and without a format ``quotaon`` has nothing to turn on.

So the tests send well-formed warnings themselves, byte for byte what ``quota_send_warning``
(fs/quota/netlink.c) sends, from a root NETLINK_GENERIC socket to the ``events`` multicast
group: a process with CAP_NET_ADMIN may send to any netlink multicast group (without it:
EPERM). The same datagram also goes to the kernel as a unicast; without NLM_F_REQUEST the
kernel drops it silently (with NLM_F_REQUEST it would answer EOPNOTSUPP: VFS_DQUOT has no
commands). The family and group ids are resolved here independently of the source (pyroute2's
sync socket) and compared with what the source resolved.

Every listener on this host receives these warnings too; they name a device number no real
device has (4095:*) except in the daemon test, which names the loop device it made.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fsnotifyd.errors import SourceUnavailable
from fsnotifyd.events import Device, Observation
from fsnotifyd.sources.quota import QuotaSource
from tests.conftest import kernel_missing
from tests.rigs.loop import loop_ext4

from . import sourcekit

pytestmark = pytest.mark.kernel

FAKE_MAJOR = 4095  # the largest major; nothing on this host uses it
NAMES = ["NOWARN", "IHARDWARN", "ISOFTLONGWARN", "ISOFTWARN", "BHARDWARN", "BSOFTLONGWARN",
         "BSOFTWARN", "IHARDBELOW", "ISOFTBELOW", "BHARDBELOW", "BSOFTBELOW"]
QTYPES = ["user", "group", "project"]


# --- what the kernel sends, encoded here from include/uapi/linux/quota.h -----------------------
def _attr(kind: int, payload: bytes, nla_len: int | None = None) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload) if nla_len is None else nla_len, kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


class Sender:
    """A root NETLINK_GENERIC socket that multicasts to VFS_DQUOT's ``events`` group."""

    def __init__(self) -> None:
        from pyroute2.netlink import genlmsg
        from pyroute2.netlink.generic import GenericNetlinkSocket

        ctl = GenericNetlinkSocket()
        try:
            ctl.bind("VFS_DQUOT", genlmsg)
            self.family_id, self.group_id = ctl.prid, ctl.mcast_groups["events"]
        finally:
            ctl.close()
        # sockaddr_nl.nl_groups is a bitmask: only groups 1..32 can be addressed by sendto.
        assert 1 <= self.group_id <= 32, f"group id {self.group_id} cannot be addressed by sendto"
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16)  # NETLINK_GENERIC
        self.sock.bind((0, 0))
        self.seq = 0

    def message(self, qtype: int, excess_id: int, warning: int, major: int, minor: int,
                caused_id: int | None = 0, *, warning_payload: bytes | None = None) -> bytes:
        body = struct.pack("=BBH", 1, 1, 0)  # QUOTA_NL_C_WARNING, version 1
        body += _attr(1, struct.pack("=I", qtype)) + _attr(2, struct.pack("=Q", excess_id))
        body += _attr(3, struct.pack("=I", warning) if warning_payload is None else warning_payload)
        body += _attr(4, struct.pack("=I", major)) + _attr(5, struct.pack("=I", minor))
        if caused_id is not None:
            body += _attr(6, struct.pack("=Q", caused_id))
        self.seq += 1
        # flags 0: not a request, so the kernel ignores its unicast copy without an answer.
        return struct.pack("=IHHII", 16 + len(body), self.family_id, 0, self.seq, 0) + body

    def send(self, datagram: bytes) -> None:
        assert self.sock.sendto(datagram, (0, 1 << (self.group_id - 1))) == len(datagram)

    def close(self) -> None:
        self.sock.close()


def _need_root() -> None:
    if os.geteuid() != 0:
        kernel_missing("needs root (CAP_NET_ADMIN) to send to a netlink multicast group")


@pytest.fixture
def sender() -> Iterator[Sender]:
    _need_root()
    try:
        s = Sender()
    except Exception as e:  # NetlinkError ENOENT: no CONFIG_QUOTA_NETLINK_INTERFACE
        kernel_missing(f"generic netlink family VFS_DQUOT not available: {e!r}")
    try:
        yield s
    finally:
        s.close()


def running(src: QuotaSource):
    return sourcekit.running(src, "quota netlink")


def _mine(got: list[Observation], ids: set[int]) -> list[Observation]:
    return [o for o in got if o.kind == "quota.warning" and o.details["id"] in ids]


# --- the source alone ---------------------------------------------------------------------------
def test_source_decodes_every_warning_sent_over_netlink(sender: Sender) -> None:
    base = random.randrange(1 << 40, 1 << 62)

    async def main() -> None:
        src = QuotaSource()
        async with running(src) as got:
            assert (src.family_id, src.group_id) == (sender.family_id, sender.group_id)
            # Every warning code, one datagram each, cycling through the quota types.
            for code in range(11):
                sender.send(sender.message(code % 3, base + code, code, FAKE_MAJOR, code, 1000 + code))
            # Every quota type with the same warning, in ONE datagram.
            sender.send(b"".join(sender.message(q, base + 20 + q, 4, FAKE_MAJOR, 20 + q, None) for q in range(3)))
            # A malformed one (WARNING of 2 bytes), then a good one.
            sender.send(sender.message(0, base + 30, 4, FAKE_MAJOR, 30, warning_payload=b"\x04\x00"))
            sender.send(sender.message(1, base + 31, 6, FAKE_MAJOR, 31, 0))
            ids = {base + i for i in (*range(11), 20, 21, 22, 31)}
            await sourcekit.wait_until(lambda: len(_mine(got, ids)) == len(ids) and src.malformed >= 1)
            await asyncio.sleep(0.1)  # nothing more should come
            mine = _mine(got, ids | {base + 30})

        by_id = {o.details["id"]: o for o in mine}
        assert len(mine) == len(by_id) == 15
        for code in range(11):
            o = by_id[base + code]
            assert o.source == "quota" and o.device == Device(FAKE_MAJOR, code, None)
            assert o.details["quota_type"] == QTYPES[code % 3]
            assert o.details["caused_id"] == 1000 + code
            assert o.details["warning"]["code"] == code and o.details["warning"]["name"] == NAMES[code]
            assert abs(o.time - time.time()) < 60
        assert [by_id[base + 20 + q].details["quota_type"] for q in range(3)] == QTYPES
        assert all(by_id[base + 20 + q].details["caused_id"] is None for q in range(3))
        assert by_id[base + 31].details["warning"]["name"] == "BSOFTWARN"
        assert base + 30 not in by_id
        st = src.status()
        assert st["malformed"] >= 1 and st["last_malformed"] == "attribute WARNING has length 2, expected 4"
        assert st["warnings"] >= 15 and st["received"] >= 16

    asyncio.run(main())


def test_overrun_is_reported_as_events_lost(sender: Sender) -> None:
    """A tiny receive buffer and a burst while the loop is busy: the kernel drops messages and
    recv fails with ENOBUFS once; the source says so and keeps reading what is queued."""
    base = random.randrange(1 << 40, 1 << 62)

    async def main() -> None:
        src = QuotaSource(receive_buffer=1024)  # the kernel rounds up to its minimum (~2 KiB)
        async with running(src) as got:
            # Sent without yielding to the loop: nothing is read while the buffer fills.
            for i in range(64):
                sender.send(sender.message(0, base + i, 6, FAKE_MAJOR, 40))
            await sourcekit.wait_until(lambda: any(o.kind == "events.lost" for o in got))
            await sourcekit.wait_until(lambda: _mine(got, {base + i for i in range(64)}))
            lost = [o for o in got if o.kind == "events.lost"]
            assert lost[0].source == "quota" and dict(lost[0].details) == {"reason": "netlink_overrun"}
            assert src.status()["overruns"] >= 1
            assert 0 < len(_mine(got, {base + i for i in range(64)})) < 64
            # Still listening after the overrun.
            sender.send(sender.message(2, base + 100, 9, FAKE_MAJOR, 41))
            await sourcekit.wait_until(lambda: _mine(got, {base + 100}))

    asyncio.run(main())


@pytest.mark.parametrize("kw, reason, hint", [
    ({"family": "FSND_NOFAMILY"}, "generic netlink family FSND_NOFAMILY is not registered",
     "CONFIG_QUOTA_NETLINK_INTERFACE"),
    ({"group": "no-such-group"}, "generic netlink family VFS_DQUOT has no multicast group 'no-such-group' "
     "(groups: events)", "quota.h"),
])
def test_missing_family_or_group_is_unavailable_before_ready(kw: dict, reason: str, hint: str) -> None:
    async def main() -> None:
        ready = asyncio.Event()
        with pytest.raises(SourceUnavailable) as err:
            await asyncio.wait_for(QuotaSource(**kw).run(lambda o: None, ready.set), 10)
        assert not ready.is_set()
        assert err.value.reason == reason and hint in (err.value.hint or "")

    asyncio.run(main())


def test_receive_error_ends_run_for_a_restart() -> None:
    """A recv error other than ENOBUFS would repeat on every wake-up: run() ends with it, so the
    daemon's supervisor restarts the source with backoff instead of spinning."""

    async def main() -> None:
        src = QuotaSource()
        ready = asyncio.Event()
        task = asyncio.create_task(src.run(lambda o: None, ready.set))
        try:
            await asyncio.wait_for(ready.wait(), 10)
            dead = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16)
            dead.close()
            src._drain(dead, lambda o: None)  # a real EBADF from a closed socket
            with pytest.raises(OSError) as err:
                await asyncio.wait_for(task, 5)
            assert err.value.errno == 9  # EBADF
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())


# --- in the daemon ------------------------------------------------------------------------------
def _wait_event(path: Path, pred: Callable[[dict], bool], timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    ev = json.loads(line)
                    if pred(ev):
                        return ev
        time.sleep(0.05)
    raise AssertionError(f"no matching event in {path} within {timeout}s")


def test_daemon_attributes_a_warning_to_the_ve(daemon, workdir: Path, sender: Sender) -> None:
    """A warning naming the VE's loop device comes out of the real daemon as one quota.warning
    event on VE 101, with the decoded details; status shows the source and its counters."""
    uid = random.randrange(100000, 1 << 31)
    ve_mount = workdir / "ve101"
    with loop_ext4(workdir=Path(tempfile.mkdtemp(dir=workdir))) as fs:
        fs.umount()
        res = fs.mount("errors=continue", target=ve_mount)
        assert res.returncode == 0, res.stderr
        key = f"{fs.devnum[0]}:{fs.devnum[1]}"
        deadline = time.monotonic() + 10
        while not any(m["devnum"] == key and m["ve"] == "101" for m in daemon.status()["mounts"]):
            assert time.monotonic() < deadline, f"daemon did not see {key} on {ve_mount}"
            time.sleep(0.05)
        quota = daemon.status()["sources"]["quota"]
        assert quota["up"], quota
        before = quota["detail"]

        major, minor = fs.devnum
        sender.send(sender.message(1, uid, 4, major, minor, 0))  # BHARDWARN, group quota
        sender.send(sender.message(1, uid, 4, major, minor, 0, warning_payload=b"\x04\x00"))
        assert daemon.events_out is not None
        ev = _wait_event(daemon.events_out, lambda e: e["kind"] == "quota.warning" and e["details"]["id"] == uid)

        assert ev["ve"] == "101"
        assert ev["device"] == {"major": major, "minor": minor, "name": fs.name}
        assert ev["mount"] == str(ve_mount) and ev["fs"] == "ext4"
        assert ev["sources"] == ["quota"] and ev["severity"] == "error" and ev["count"] == 1
        assert ev["details"] == {
            "quota_type": "group", "id": uid, "caused_id": 0,
            "warning": {"code": 4, "name": "BHARDWARN", "resource": "blocks", "limit": "hard",
                        "grace_expired": False, "below": False,
                        "text": f"Group {uid} on {major}:{minor} reached its block hard limit; writes fail."},
        }

        deadline = time.monotonic() + 5
        while True:
            quota = daemon.status()["sources"]["quota"]
            d = quota["detail"]
            if d["malformed"] > before["malformed"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert quota["up"] and quota["reason"] is None
        assert d["received"] >= before["received"] + 2
        assert d["warnings"] >= before["warnings"] + 1
        assert d["malformed"] >= before["malformed"] + 1
        assert d["last_malformed"] == "attribute WARNING has length 2, expected 4"
        assert (d["family_id"], d["group_id"]) == (sender.family_id, sender.group_id)
        assert any('"quota.malformed"' in line and '"field": "WARNING"' in line
                   for line in daemon.log().splitlines()), daemon.log()[-2000:]

        # The command line shows it too.
        out = subprocess.run([sys.executable, "-m", "fsnotifyd.cli", "status", "--socket", daemon.socket],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert re.search(r"^\s+quota\s+up\s+observations=\d+", out.stdout, re.M), out.stdout
        js = json.loads(subprocess.run([sys.executable, "-m", "fsnotifyd.cli", "status", "--json", "--socket",
                                        daemon.socket], capture_output=True, text=True, timeout=30).stdout)
        assert js["sources"]["quota"]["detail"]["warnings"] >= 1

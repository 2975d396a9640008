"""The BPF sources on the real kernel, through the real daemon: ext4 errors from the tracepoint,
an ENOSPC storm by an unprivileged user in a cgroup, allocation telemetry on a churn workload,
and the daemon degrading when bcc cannot be imported.

Everything runs as root on loop-mounted ext4; each test removes its mounts, loops and cgroups
in ``finally``/context managers, also when it fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import shutil
import subprocess
import tempfile
import textwrap
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import _check_kernel, kernel_missing
from tests.rigs.daemon import RunningDaemon
from tests.rigs.loop import loop_ext4
from tests.rigs.net import free_port

NOBODY = 65534


def _dir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


@contextlib.contextmanager
def open_dir(prefix: str) -> Iterator[Path]:
    """A temporary directory the unprivileged writer can reach (mkdtemp makes 0700 ones)."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        d.chmod(0o755)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)



def fill_as_root(mnt: Path) -> None:
    """Use every block (root may take the reserved ones); afterwards a user gets ENOSPC."""
    subprocess.run(["dd", "if=/dev/zero", f"of={mnt}/fill", "bs=1M", "status=none"], stderr=subprocess.DEVNULL)
    os.sync()


def test_bpf_show_prints_what_is_loaded(bpf_ready, tmp_path):
    """`fsnotifyd bpf show` prints exactly the text the loader compiles; `bpf check` loads all."""
    from fsnotifyd.sources import bpfload
    from fsnotifyd.sources.bpf_alloc import defines

    out = subprocess.run([_python(), "-m", "fsnotifyd.cli", "bpf", "show", "alloc"], capture_output=True,
                         text=True, check=True)
    assert out.stdout == bpfload.program_text("alloc", defines(1 << 20))
    assert "typedef u64 ext4_fsblk_t;" in out.stdout and "#define FSND_DEFAULT_SHIFT 8" in out.stdout
    check = subprocess.run([_python(), "-m", "fsnotifyd.cli", "bpf", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    for name in bpfload.PROGRAMS:
        assert f"{name}" in check.stdout and "compile+attach" in check.stdout


def _python() -> str:
    import sys

    return sys.executable


def test_every_ext4_error_carries_bpf_function_and_line(bpf_ready, tmp_path):
    """One error is one event merged from bpf, kmsg, fanotify and sysfs. Then 30 errors in a
    burst: the tracepoint source sees all 30 (kmsg prints 10 under ext4's rate limit), and the
    burst is counted, not dropped: the counts add up to the errors_count rise. (Within a burst
    the views of consecutive errors interleave, so which event carries which source varies;
    the sum does not; so the rate limit is shown by counting kmsg's own lines of the burst.)"""
    token = f"burst-{uuid.uuid4().hex[:12]}"
    with loop_ext4(32, workdir=_dir(tmp_path / "fs")) as fs:
        d = RunningDaemon(tmp_path / "d", extra_config=f"ves:\n  - id: ve-err\n    mount: {fs.mountpoint}\n")
        with d:
            d.wait_marked(fs)
            stream = d.stream(["fs.error"])
            try:
                fs.sysfs.joinpath("trigger_fs_error").write_text("single\n")
                one = stream.wait_for(lambda e: e["ve"] == "ve-err", timeout=10)
                stream.settle(1.0)
                single = [e for e in stream.events if e["ve"] == "ve-err"]
                stream.events.clear()
                seen_before = d.status()["sources"]["bpf_errors"]["detail"]["errors"]
                before = fs.errors_count()
                for i in range(30):
                    fs.sysfs.joinpath("trigger_fs_error").write_text(f"{token} {i}\n")
                mine = lambda e: e["ve"] == "ve-err"  # noqa: E731
                deadline = time.monotonic() + 15
                while sum(e["count"] for e in stream.events if mine(e)) < 30 and time.monotonic() < deadline:
                    time.sleep(0.05)
                stream.settle(1.0)
                events = [e for e in stream.events if mine(e)]
                seen = d.status()["sources"]["bpf_errors"]["detail"]["errors"] - seen_before
            finally:
                stream.close()
            after = fs.errors_count()
    assert one and len(single) == 1, single
    assert set(single[0]["sources"]) == {"bpf", "kmsg", "fanotify", "sysfs"} and single[0]["count"] == 1
    assert single[0]["kernel"]["function"] == "trigger_test_error" and isinstance(single[0]["kernel"]["line"], int)
    assert seen == 30, f"the tracepoint source saw {seen} of 30 errors"
    assert sum(e["count"] for e in events) == after - before == 30
    printed = subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout.count(token)
    assert 0 < printed < 30, f"kmsg printed {printed} of the burst's 30 errors (ext4's rate limit should hold it to 10)"
    for e in events:
        assert e["kernel"]["function"] == "trigger_test_error" and isinstance(e["kernel"]["line"], int)


WRITER = textwrap.dedent("""
    import os, sys
    path, n, falloc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    buf = b"y" * 4096
    failed = 0
    for _ in range(n):
        try:
            os.write(fd, buf)
        except OSError as e:
            assert e.errno == 28, e
            failed += 1
    ffailed = 0
    for i in range(falloc):
        try:
            os.posix_fallocate(fd, (i + 1) << 20, 1 << 20)
        except OSError as e:
            assert e.errno == 28, e
            ffailed += 1
    print(failed, ffailed)
""")


def test_million_enospc_are_a_handful_of_events_with_exact_counts(bpf_ready, make_cgroup, tmp_path):
    """1,000,000 failing writes by an unprivileged user in a cgroup mapped to a VE: fs.enospc
    events attributed to the VE whose counts add up to exactly 1,000,000 writes, in a handful
    of events; fallocate failures reach ext4's allocator, whose tracepoint (enabled with
    ``ext4_devices``) names the device."""
    n, falloc = 1_000_000, 100
    with open_dir("fsnd-enospc-") as top, make_cgroup("fsnd-enospc") as cg, \
            loop_ext4(32, workdir=_dir(top / "fs")) as fs:
        fs.mountpoint.chmod(0o777)
        fill_as_root(fs.mountpoint)
        (top / "writer.py").write_text(WRITER)
        d = RunningDaemon(tmp_path / "d", extra_config=textwrap.dedent(f"""\
            ves:
              - id: ve-space
                mount: {fs.mountpoint}
                cgroup: {cg}
            sources:
              bpf_space: {{ext4_devices: true}}
            """))
        with d:
            stream = d.stream(["fs.enospc"])
            try:
                out = subprocess.run(
                    ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec setpriv --reuid={NOBODY} --regid={NOBODY} '
                                 f'--clear-groups /usr/bin/python3 {top}/writer.py {fs.mountpoint}/x {n} {falloc}'],
                    capture_output=True, text=True, timeout=300)
                assert out.returncode == 0, out.stderr
                assert out.stdout.split() == [str(n), str(falloc)]
                total = lambda: sum(e["count"] for e in stream.events if e["ve"] == "ve-space")  # noqa: E731
                deadline = time.monotonic() + 30
                while total() < n + falloc and time.monotonic() < deadline:
                    time.sleep(0.2)
                stream.settle(2.5)
                events = [e for e in stream.events if e["ve"] == "ve-space"]
                # Summarising a storm names its syscalls without bcc: the compiler stays out
                # of the daemon (once, bcc.syscall pulled LLVM in at the first storm).
                maps = Path(f"/proc/{d.proc.pid}/maps").read_text()
                assert "libbcc" not in maps and "libLLVM" not in maps
            finally:
                stream.close()
    assert sum(e["count"] for e in events) == n + falloc
    assert sum(e["details"]["syscalls"].get("write", 0) for e in events) == n
    assert sum(e["details"]["syscalls"].get("fallocate", 0) for e in events) == falloc
    assert 1 <= len(events) <= 60, f"{len(events)} events for a storm: not summarised"
    for e in events:
        assert e["kernel"]["errno"]["name"] == "ENOSPC"
        assert e["details"]["cgroups"][0] == "/" + cg.name
        assert all(p["comm"] == "python3" for p in e["details"]["processes"])
    # the device: from ext4's block-mapping tracepoint where the failure reached the allocator
    by_ext4 = [e for e in events if e["details"]["device_from"] == "ext4"]
    assert by_ext4, [e["details"]["devices"] for e in events]
    dev = os.stat(fs.loop).st_rdev
    assert all((e["device"]["major"], e["device"]["minor"]) == (os.major(dev), os.minor(dev)) for e in by_ext4)


def _syncfs(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        ctypes.CDLL(None, use_errno=True).syncfs(fd)
    finally:
        os.close(fd)


def churn(mnt: Path, fs_bytes: int, times: float, seed: int = 7) -> None:
    """Varied file sizes, oldest deleted to keep ~40 % in use, until ``times`` x fs written."""
    rnd = random.Random(seed)
    live: list[tuple[Path, int]] = []
    used = written = 0
    since_sync = 0
    chunk = os.urandom(1 << 20)
    i = 0
    while written < times * fs_bytes:
        size = int(2 ** rnd.uniform(16, 22))  # 64 KiB .. 4 MiB
        sub = mnt / f"d{i % 16}"
        sub.mkdir(exist_ok=True)
        p = sub / f"f{i}"
        with open(p, "wb") as f:
            left = size
            while left:
                k = min(left, len(chunk))
                f.write(chunk[:k])
                left -= k
        live.append((p, size))
        used += size
        written += size
        since_sync += size
        i += 1
        while used > 0.4 * fs_bytes:
            old, sz = live.pop(0)
            old.unlink()
            used -= sz
        if since_sync > 32 << 20:
            _syncfs(mnt)
            since_sync = 0
    _syncfs(mnt)


def test_allocation_telemetry_shows_swelling_and_trim(bpf_ready, tmp_path):
    """A churn workload spreads allocations: regions touched rise past what the data needs
    (swelling > 1); fstrim shows up as discards and releases whole regions. The swelling gauge
    is scraped while the VE has its filesystem mounted, and is gone once it is unmounted (a
    stopped VE must not keep the swelling alert firing)."""
    port = free_port()
    gauge = "fsnotifyd_fs_swelling_ratio{device=\"%s\",ve=\"ve-alloc\"}"

    def scrape() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

    with loop_ext4(256, workdir=_dir(tmp_path / "fs")) as fs:
        d = RunningDaemon(tmp_path / "d", metrics_port=port, extra_config=textwrap.dedent(f"""\
            ves:
              - id: ve-alloc
                mount: {fs.mountpoint}
            sources:
              bpf_alloc: {{interval: 0.5}}
            """))
        with d:
            stream = d.stream(["fs.alloc"])
            try:
                mine = lambda e: e["ve"] == "ve-alloc"  # noqa: E731
                for _ in range(3):
                    churn(fs.mountpoint, 256 << 20, 1.0, seed=_)
                    time.sleep(1.2)
                stream.settle(1.2)
                before_trim = [e for e in stream.events if mine(e)]
                # ext4 trims only blocks whose freeing is committed: without the journal commit a
                # trim right after the churn found 488 blocks to discard (a CI failure).
                subprocess.run(["sync", "-f", str(fs.mountpoint)], check=True)
                subprocess.run(["fstrim", str(fs.mountpoint)], check=True)
                trimmed = stream.wait_for(lambda e: mine(e) and e["details"]["blocks_discarded"] > 0, timeout=10)
            finally:
                stream.close()
            mounted_scrape = scrape()
            fs.umount()
            deadline = time.monotonic() + 10  # the mount table is polled every 0.5 s
            while gauge % fs.name in (unmounted_scrape := scrape()) and time.monotonic() < deadline:
                time.sleep(0.2)
    touched = [e["details"]["regions_touched_total"] for e in before_trim]
    assert len(touched) >= 3, before_trim
    assert touched == sorted(touched) and touched[-1] > touched[0], touched
    last = before_trim[-1]["details"]
    assert sum(e["details"]["blocks_allocated"] for e in before_trim) > 3 * 0.9 * (256 << 20) // 4096
    assert last["swelling"] > 1.0, last
    assert last["regions_live"] > last["regions_needed"]
    t = trimmed[0]["details"]
    assert t["regions_released"] > 0 and t["regions_live"] < last["regions_live"], (t, last)
    assert gauge % fs.name in mounted_scrape, mounted_scrape
    assert gauge % fs.name not in unmounted_scrape and "fsnotifyd_alloc_regions_live{" not in unmounted_scrape


def test_daemon_without_bcc_degrades_and_keeps_its_other_sources(tmp_path):
    """bcc made unimportable (a sitecustomize that refuses the import: the one way to take a
    system package away from one process without uninstalling it for everyone): the three BPF
    sources are down with the reason, source_up says 0, and errors still arrive from the rest."""
    reason = _check_kernel()
    if reason:
        kernel_missing(reason)
    hide = tmp_path / "hide-bcc"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        class _NoBcc:
            def find_spec(self, name, path=None, target=None):
                if name == "bcc" or name.startswith("bcc."):
                    raise ImportError("bcc hidden by the test")
                return None
        sys.meta_path.insert(0, _NoBcc())
    """))
    port = free_port()
    with loop_ext4(32, workdir=_dir(tmp_path / "fs")) as fs:
        d = RunningDaemon(tmp_path / "d", metrics_port=port, env={"PYTHONPATH": f"{hide}:{os.getcwd()}"},
                          extra_config=f"ves:\n  - id: ve-nobcc\n    mount: {fs.mountpoint}\n")
        with d:
            st = d.status()["sources"]
            for name in ("bpf_errors", "bpf_space", "bpf_alloc"):
                assert st[name]["up"] is False and "bcc is not importable" in st[name]["reason"], st[name]
                assert "python3-bpfcc" in st[name]["hint"]
            assert st["kmsg"]["up"] and st["fanotify"]["up"] and st["quota"]["up"]
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            assert 'fsnotifyd_source_up{source="bpf_errors"} 0.0' in metrics
            assert 'fsnotifyd_source_up{source="kmsg"} 1.0' in metrics
            d.wait_marked(fs)
            stream = d.stream(["fs.error"])
            try:
                fs.sysfs.joinpath("trigger_fs_error").write_text("without bcc\n")
                got = stream.wait_for(lambda e: e["ve"] == "ve-nobcc", timeout=10)
            finally:
                stream.close()
    assert got and "bpf" not in got[0]["sources"] and "kmsg" in got[0]["sources"]

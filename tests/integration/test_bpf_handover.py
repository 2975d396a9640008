"""The BPF programs are compiled in a child that hands them over and exits (issue 15, item 1).

The daemon must hold the programs (attached, their maps readable) without bcc, LLVM or clang in
its own address space; closing what it holds detaches them; a program that fails to compile
reports the compiler's reason and leaks no descriptor. Real kernel, real bcc, loop-mounted
ext4; every mount and daemon is removed in ``finally``/context managers.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fsnotifyd.sources import bpfload
from tests.rigs.daemon import RunningDaemon
from tests.rigs.loop import loop_ext4

COMPILER_LIBS = ("libbcc", "libLLVM", "libclang")


def _dir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _mapped_libraries(pid: int) -> set[str]:
    out = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[5].startswith("/"):
            out.add(os.path.basename(parts[5]))
    return out


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d.name))
    return kids


def test_daemon_runs_its_bpf_sources_without_the_compiler(bpf_ready, tmp_path):
    """Every BPF source up, an error seen by the tracepoint, and no bcc/LLVM/clang mapped in
    the daemon (bcc keeps ~240 MB of LLVM in whichever process compiles); no compiler child left."""
    with loop_ext4(32, workdir=_dir(tmp_path / "fs")) as fs:
        d = RunningDaemon(tmp_path / "d", extra_config=f"ves:\n  - id: ve-h\n    mount: {fs.mountpoint}\n")
        with d:
            st = d.status()
            for name in ("bpf_errors", "bpf_space", "bpf_alloc"):
                assert st["sources"][name]["up"], st["sources"][name]
            d.wait_marked(fs)
            stream = d.stream(["fs.error"])
            try:
                fs.sysfs.joinpath("trigger_fs_error").write_text("handover\n")
                found = stream.wait_for(lambda e: e["ve"] == "ve-h" and "bpf" in e["sources"], timeout=10)
            finally:
                stream.close()
            assert found and found[0]["kernel"]["function"] == "trigger_test_error", found
            libs = _mapped_libraries(d.proc.pid)
            assert not [lib for lib in libs if lib.startswith(COMPILER_LIBS)], sorted(libs)
            assert _children(d.proc.pid) == []


def test_closing_the_links_detaches_the_program(bpf_ready, tmp_path):
    """While attached, every error is one ring-buffer record; once the link fds are closed
    (the map kept open through a dup) no error reaches the map any more."""
    with loop_ext4(32, workdir=_dir(tmp_path / "fs")) as fs:
        prog = bpfload.load("ext4_error")
        keep = os.dup(prog["errors"].map_fd)
        try:
            ring = prog.ring_buffer("errors")
            table = prog["errors"]
            mine: list[str] = []

            def on(buf, off, size):
                ev = table.event(buf, off)
                if (ev.dev >> 20, ev.dev & 0xFFFFF) == fs.devnum:
                    mine.append(ev.function.decode())

            for i in range(5):
                fs.sysfs.joinpath("trigger_fs_error").write_text(f"attached {i}\n")
            deadline = time.monotonic() + 5
            while len(mine) < 5 and time.monotonic() < deadline:
                ring.consume(on)
                time.sleep(0.01)
            assert mine == ["trigger_test_error"] * 5
            assert set(prog.links) == {"tracepoint:ext4:ext4_error"}
            ring.close()
            prog.rings.clear()
            for fd in prog.links.values():
                os.close(fd)
            prog.links.clear()
            fs.sysfs.joinpath("trigger_fs_error").write_text("detached\n")
            time.sleep(0.2)
            from fsnotifyd.sources.ringbuf import RingBuffer

            again = RingBuffer(keep, prog["errors"].max_entries)
            try:
                mine.clear()
                again.consume(on)
                assert mine == []
            finally:
                again.close()
        finally:
            prog.close()
            os.close(keep)


def test_a_program_that_does_not_compile_says_why_and_leaks_nothing(bpf_ready, monkeypatch):
    before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(bpfload, "program_text", lambda name, defines=None: "int broken( {\n")
    with pytest.raises(bpfload.ProbeUnavailable) as e:
        bpfload.load("ext4_error")
    assert "did not load" in e.value.reason and "ext4_error" in e.value.reason
    assert len(os.listdir("/proc/self/fd")) == before

"""The one place that turns ``bpf/*.c`` into attached programs (bcc), or says why it cannot.

bcc compiles in a short-lived child (:mod:`.bpfchild`) that attaches the program, hands the
map and attachment fds over on a unix socket (SCM_RIGHTS) and exits, so LLVM never lives in the
daemon; the daemon reads the maps through ``bpf()`` (:mod:`.bpfsys`) and the ring buffers by
mmap (:mod:`.ringbuf`). Closing those fds (:meth:`Loaded.close`) detaches the program.

Every program is loaded on its own, so one that cannot run here (a tracepoint this kernel
lacks, a verifier refusal) costs only its own source. The reasons are checked in the order an
operator would fix them: not root, no bcc, no kernel headers, no tracefs, a missing tracepoint,
then whatever the compiler or the verifier said. The C that is loaded is exactly
:func:`program_text`, which ``fsnotifyd bpf show`` prints.

Header fallback: bcc compiles against ``/lib/modules/$(uname -r)/build``; the machines this is
built for run a newer kernel than their headers, so ``bpf/compat.h`` (prepended to every
program) defines the ext4 types the tracepoint format files name. The daemon mounts tracefs at
``/sys/kernel/tracing`` when nothing is mounted there: bcc reads the tracepoint formats from it,
and decides where tracefs is when it is first imported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SourceUnavailable
from . import bpflayout, bpfsys
from .ringbuf import RingBuffer

TRACEFS = "/sys/kernel/tracing"


@dataclass(frozen=True)
class Program:
    name: str
    file: str
    tracepoints: tuple[str, ...]  # "category/event", all must exist
    about: str


PROGRAMS: dict[str, Program] = {
    p.name: p
    for p in (
        Program("ext4_error", "ext4_error.c", ("ext4/ext4_error",),
                "every ext4 error (device, function, line), not rate limited"),
        Program("space", "space.c",
                ("raw_syscalls/sys_exit",),
                "ENOSPC/EDQUOT counted per cgroup, process, syscall and device"),
        Program("alloc", "alloc.c", ("ext4/ext4_allocate_blocks", "ext4/ext4_free_blocks", "ext4/ext4_discard_blocks"),
                "blocks allocated, freed, discarded and image-cluster regions touched, per device"),
    )
}

# Sources load concurrently (each in a worker thread) and each may find tracefs unmounted.
_TRACEFS = threading.Lock()


class ProbeUnavailable(SourceUnavailable):
    pass


BCC_HINT = ("apt install python3-bpfcc and link /usr/lib/python3/dist-packages/bcc into the "
            "virtualenv (scripts/bootstrap.sh does both); the PyPI package 'bcc' is another project")


def bpf_dir() -> Path:
    """Where the C sources are: $FSNOTIFYD_BPF_DIR, the source tree, or the installed share dir."""
    env = os.environ.get("FSNOTIFYD_BPF_DIR")
    if env:
        return Path(env)
    tree = Path(__file__).resolve().parents[2] / "bpf"
    if (tree / "compat.h").exists():
        return tree
    return Path(sys.prefix) / "share" / "fsnotifyd" / "bpf"


def program_text(name: str, defines: Mapping[str, int | str] | None = None, directory: Path | None = None) -> str:
    """The exact C handed to bcc for ``name``: compat.h, the defines, the program."""
    prog = PROGRAMS[name]
    d = directory or bpf_dir()
    try:
        compat = (d / "compat.h").read_text()
        body = (d / prog.file).read_text()
    except OSError as e:
        raise ProbeUnavailable(f"BPF source missing: {e.filename}: {e.strerror}",
                               "set FSNOTIFYD_BPF_DIR to the bpf/ directory of fsnotifyd") from e
    lines = [f"/* fsnotifyd BPF program '{name}' ({prog.file}) */", compat]
    lines += [f"#define {k} {v}" for k, v in sorted((defines or {}).items())]
    lines.append(body)
    return "\n".join(lines)


def headers_dir() -> str:
    return f"/lib/modules/{os.uname().release}/build"


def _tracefs_mounted(root: str) -> bool:
    return os.path.isdir(os.path.join(root, "events")) or os.path.isdir("/sys/kernel/debug/tracing/events")


def ensure_tracefs(root: str = TRACEFS) -> str | None:
    """Mount tracefs if it is not mounted; returns a reason when tracepoints stay unreachable."""
    if _tracefs_mounted(root):
        return None
    if os.geteuid() != 0:
        return f"tracefs is not mounted at {root}"
    # One mount for all the sources that start together: the second would fail with
    # "already mounted" and take its source down on a fresh machine.
    with _TRACEFS:
        if _tracefs_mounted(root):
            return None
        r = subprocess.run(["mount", "-t", "tracefs", "nodev", root], capture_output=True, text=True)
        if _tracefs_mounted(root):
            return None
    return f"tracefs is not mounted at {root} and mounting it failed: {r.stderr.strip() or r.returncode}"


def tracepoint_exists(tp: str) -> bool:
    return any(os.path.isdir(os.path.join(base, "events", tp))
               for base in (TRACEFS, "/sys/kernel/debug/tracing"))


def unavailable_reason(name: str) -> tuple[str, str] | None:
    """(reason, hint) when program ``name`` cannot be loaded here, checked before compiling."""
    if os.geteuid() != 0:
        return "not root (loading BPF needs CAP_BPF and CAP_PERFMON or CAP_SYS_ADMIN)", "run the daemon as root"
    # Found, not imported: importing bcc would map LLVM into the daemon for its whole life.
    try:
        found = importlib.util.find_spec("bcc") is not None
        why = "no module named 'bcc'"
    except (ImportError, ValueError) as e:  # a finder that refuses it
        found, why = False, str(e)
    if not found:
        return f"bcc is not importable ({why})", BCC_HINT
    if not os.path.isdir(headers_dir()):
        return (f"no kernel headers at {headers_dir()}",
                "install linux-headers for this kernel, or link Debian's linux-headers-amd64 there "
                "(scripts/bootstrap.sh); see docs/troubleshooting.md")
    reason = ensure_tracefs()
    if reason:
        return reason, "mount -t tracefs nodev /sys/kernel/tracing"
    missing = [tp for tp in PROGRAMS[name].tracepoints if not tracepoint_exists(tp)]
    if missing:
        return f"this kernel has no tracepoint {', '.join(missing)}", "needs CONFIG_FTRACE and ext4"
    return None


@dataclass
class Loaded:
    """One program attached: its maps by name and the descriptors that keep it attached."""
    name: str
    maps: dict[str, bpfsys.Map]
    links: dict[str, int]
    text: str
    load_seconds: float  # the whole hand-over: child start, import bcc, compile, attach
    detail: dict[str, Any] = field(default_factory=dict)
    rings: dict[str, RingBuffer] = field(default_factory=dict)

    def __getitem__(self, name: str | bytes) -> bpfsys.Map:
        key = name.decode() if isinstance(name, bytes) else name
        return self.maps[key]

    def ring_buffer(self, name: str) -> RingBuffer:
        """The mmap consumer of ring-buffer map ``name`` (one per map, made on first use)."""
        if name not in self.rings:
            m = self.maps[name]
            self.rings[name] = RingBuffer(m.map_fd, m.max_entries)
        return self.rings[name]

    def close(self) -> None:
        """Detach (the link fds go first) and let the maps go."""
        for ring in self.rings.values():
            ring.close()
        self.rings.clear()
        for fd in list(self.links.values()) + [m.map_fd for m in self.maps.values()]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.links.clear()
        self.maps.clear()


def _child_command(sock_fd: int) -> list[str]:
    return [sys.executable, "-m", "fsnotifyd.sources.bpfchild", str(sock_fd)]


def _receive(parent: socket.socket, proc: subprocess.Popen[bytes], name: str) -> tuple[dict[str, Any], list[int]]:
    """The child's one message, or ProbeUnavailable when it died without one."""
    try:
        data, fds, _flags, _addr = socket.recv_fds(parent, 1 << 20, 253)
    except OSError as e:
        raise ProbeUnavailable(f"BPF program '{name}': the compiler process failed: {e}",
                               "see the daemon's stderr for the compiler's own output") from e
    if not data:
        rc = proc.wait()
        raise ProbeUnavailable(f"BPF program '{name}': the compiler process exited ({rc}) without an answer",
                               "see the daemon's stderr for the compiler's own output")
    return json.loads(data), fds


def load(name: str, defines: Mapping[str, int | str] | None = None) -> Loaded:
    """Compile and attach ``name`` in a child process and take over its descriptors (blocking).

    Call it from a worker thread. The daemon never imports bcc: the child does, and exits once
    the program is attached (see :mod:`.bpfchild`).
    """
    why = unavailable_reason(name)
    if why:
        raise ProbeUnavailable(*why)
    text = program_text(name, defines)
    t0 = time.monotonic()
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fds: list[int] = []
    try:
        with child:
            proc = subprocess.Popen(_child_command(child.fileno()), stdin=subprocess.PIPE,
                                    pass_fds=(child.fileno(),), close_fds=True)
        try:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"name": name, "text": text}).encode())
            proc.stdin.close()
            msg, fds = _receive(parent, proc, name)
        finally:
            rc = proc.wait()
        if msg.get("type") == "BccMissing":
            raise ProbeUnavailable(msg["error"], BCC_HINT)
        if "error" in msg:
            raise ProbeUnavailable(f"BPF program '{name}' did not load: {msg['error']}",
                                   f"fsnotifyd bpf show {name} prints the C; the kernel log and "
                                   "stderr carry the compiler or verifier message")
        if rc != 0:
            raise ProbeUnavailable(f"BPF program '{name}': the compiler process exited {rc}", "")
        loaded = _adopt(name, text, msg, fds, time.monotonic() - t0)
        fds = []
        return loaded
    finally:
        parent.close()
        for fd in fds:
            os.close(fd)


def _adopt(name: str, text: str, msg: dict[str, Any], fds: list[int], seconds: float) -> Loaded:
    """Build the maps from the child's description; fds come maps first, then links."""
    specs, link_names = msg["maps"], msg["links"]
    if len(fds) != len(specs) + len(link_names):
        raise ProbeUnavailable(f"BPF program '{name}': {len(fds)} descriptors received, "
                               f"{len(specs) + len(link_names)} announced", "")
    maps: dict[str, bpfsys.Map] = {}
    try:
        for spec, fd in zip(specs, fds[:len(specs)], strict=True):
            if spec["type"] == bpfsys.RINGBUF:
                event = bpflayout.build(spec["event"]) if "event" in spec else None
                maps[spec["name"]] = bpfsys.Map(spec["name"], fd, None, None, event)
            else:
                maps[spec["name"]] = bpfsys.Map(spec["name"], fd, bpflayout.build(spec["key"]),
                                                bpflayout.build(spec["leaf"]))
    except (ValueError, OSError) as e:
        raise ProbeUnavailable(f"BPF program '{name}': a map did not match its description: {e}", "") from e
    links = dict(zip(link_names, fds[len(specs):], strict=True))
    return Loaded(name, maps, links, text, seconds, {"compile_seconds": round(msg.get("compile_seconds", 0.0), 3)})

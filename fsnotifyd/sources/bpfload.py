"""The one place that turns ``bpf/*.c`` into attached programs (bcc), or says why it cannot.

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

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import SourceUnavailable

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

# libbcc's compiler is not documented as safe to run from two threads at once; sources load
# concurrently (each in a worker thread), so compiles take turns.
_COMPILE = threading.Lock()


class ProbeUnavailable(SourceUnavailable):
    pass


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


def ensure_tracefs(root: str = TRACEFS) -> str | None:
    """Mount tracefs if it is not mounted; returns a reason when tracepoints stay unreachable."""
    if os.path.isdir(os.path.join(root, "events")) or os.path.isdir("/sys/kernel/debug/tracing/events"):
        return None
    if os.geteuid() != 0:
        return f"tracefs is not mounted at {root}"
    r = subprocess.run(["mount", "-t", "tracefs", "nodev", root], capture_output=True, text=True)
    if r.returncode != 0 or not os.path.isdir(os.path.join(root, "events")):
        return f"tracefs is not mounted at {root} and mounting it failed: {r.stderr.strip() or r.returncode}"
    return None


def tracepoint_exists(tp: str) -> bool:
    return any(os.path.isdir(os.path.join(base, "events", tp))
               for base in (TRACEFS, "/sys/kernel/debug/tracing"))


def unavailable_reason(name: str) -> tuple[str, str] | None:
    """(reason, hint) when program ``name`` cannot be loaded here, checked before compiling."""
    if os.geteuid() != 0:
        return "not root (loading BPF needs CAP_BPF and CAP_PERFMON or CAP_SYS_ADMIN)", "run the daemon as root"
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        return (f"bcc is not importable ({e})",
                "apt install python3-bpfcc and link /usr/lib/python3/dist-packages/bcc into the "
                "virtualenv (scripts/bootstrap.sh does both); the PyPI package 'bcc' is another project")
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
    name: str
    bpf: Any  # bcc.BPF
    text: str
    load_seconds: float
    detail: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        try:
            self.bpf.cleanup()
        except Exception:  # noqa: BLE001 - detaching at shutdown must not mask the real exit
            pass


def load(name: str, defines: Mapping[str, int | str] | None = None) -> Loaded:
    """Compile and attach ``name`` (blocking: call it from a worker thread)."""
    why = unavailable_reason(name)
    if why:
        raise ProbeUnavailable(*why)
    text = program_text(name, defines)
    from bcc import BPF

    with _COMPILE:
        t0 = time.monotonic()
        try:
            b = BPF(text=text.encode())
        except Exception as e:  # bcc raises Exception for compile and verifier failures alike
            first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise ProbeUnavailable(f"BPF program '{name}' did not load: {first}",
                                   f"fsnotifyd bpf show {name} prints the C; the kernel log and "
                                   "stderr carry the compiler or verifier message") from e
        return Loaded(name, b, text, time.monotonic() - t0)

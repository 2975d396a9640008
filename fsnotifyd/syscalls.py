"""System call names by number, from the kernel's own UAPI header (``asm/unistd_64.h``).

The ENOSPC/EDQUOT summaries name the syscall that failed. bcc has such a table
(``bcc.syscall``), but importing bcc maps LLVM into the process: the daemon must not, so the
names come from the header Debian's linux-libc-dev installs (a dependency of libc6-dev). A
number the header does not know (a syscall newer than the headers) stays a number. The parser
is pure; :func:`name` reads the header once.
"""

from __future__ import annotations

import os
import platform
import re
from functools import lru_cache

_DEFINE = re.compile(r"^#define\s+__NR_(\w+)\s+(\d+)\s*$", re.M)


def parse_unistd(text: str) -> dict[int, str]:
    """``{number: name}`` from the ``#define __NR_<name> <number>`` lines of a unistd header."""
    return {int(nr): n for n, nr in _DEFINE.findall(text)}


def header_paths(machine: str | None = None) -> list[str]:
    m = machine or platform.machine()
    multiarch = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(m, f"{m}-linux-gnu")
    # aarch64 has no unistd_64.h: its numbers are the generic table in asm-generic/unistd.h
    files = ["unistd_64.h"] if m == "x86_64" else ["unistd_64.h", "unistd.h"]
    return [os.path.join(base, f) for base in (f"/usr/include/{multiarch}/asm", "/usr/include/asm",
                                               "/usr/include/asm-generic") for f in files]


@lru_cache(maxsize=1)
def table() -> dict[int, str]:
    for path in header_paths():
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                found = parse_unistd(f.read())
        except OSError:
            continue
        if found:
            return found
    return {}


def name(nr: int) -> str:
    return table().get(nr, str(nr))

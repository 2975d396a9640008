"""A scratch cgroup v2 directory for tests that move processes (root)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path


def cgroup2_root() -> str | None:
    """Where the cgroup v2 hierarchy is mounted (hybrid hosts: ``/sys/fs/cgroup/unified``)."""
    for root in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        if os.path.exists(os.path.join(root, "cgroup.procs")) and os.path.ismount(root):
            return root
    return None


@contextlib.contextmanager
def scratch_cgroup(name: str) -> Iterator[Path]:
    """A fresh cgroup v2 directory ``<name>-<pid>``, removed afterwards (once its tasks exited)."""
    root = cgroup2_root()
    if root is None:
        raise FileNotFoundError("no cgroup v2 hierarchy mounted")
    path = Path(root) / f"{name}-{os.getpid()}"
    path.mkdir()
    try:
        yield path
    finally:
        for _ in range(100):  # the last task may still be exiting
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)

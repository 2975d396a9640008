"""Integration fixtures: a real daemon subprocess per module, real loop-mounted ext4."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from tests.rigs.daemon import RunningDaemon


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="fsnd-it-") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def daemon(workdir, request):
    """A running daemon whose VE '101' is whatever is mounted at <workdir>/ve101."""
    from tests.conftest import _check_kernel, kernel_missing

    reason = _check_kernel()
    if reason:
        kernel_missing(reason)
    (workdir / "ve101").mkdir(exist_ok=True)
    d = RunningDaemon(workdir / "daemon",
                      extra_config=f"ves:\n  - id: '101'\n    mount: {workdir / 've101'}\n")
    d.start()
    try:
        yield d
    finally:
        rc = d.stop()
        assert rc == 0, f"daemon exited {rc}: {d.log()[-3000:]}"


@pytest.fixture
def bpf_ready() -> None:
    """Root, loop ext4, and every BPF program loadable here (bcc, headers, tracepoints)."""
    from fsnotifyd.sources import bpfload
    from tests.conftest import _check_kernel, kernel_missing

    reason = _check_kernel()
    if reason:
        kernel_missing(reason)
    for name in bpfload.PROGRAMS:
        why = bpfload.unavailable_reason(name)
        if why:
            kernel_missing(f"BPF program {name} cannot load here: {why[0]}")


@pytest.fixture
def make_cgroup():
    """``make_cgroup(name)``: a scratch cgroup v2 context (missing v2: skip, or fail in CI)."""
    from tests.conftest import kernel_missing
    from tests.rigs.cgroup import cgroup2_root, scratch_cgroup

    if cgroup2_root() is None:
        kernel_missing("no cgroup v2 hierarchy mounted")
    return scratch_cgroup

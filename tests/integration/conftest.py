"""Integration fixtures: a real daemon subprocess per module, real loop-mounted ext4."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from fsnotifyd.testing import RunningDaemon


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

"""Shared fixtures. Kernel tests skip outside CI with the reason printed; with
FSNOTIFYD_REQUIRE_KERNEL=1 (set by .ci/run) a missing capability fails the run instead."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REQUIRE_KERNEL = os.environ.get("FSNOTIFYD_REQUIRE_KERNEL") == "1"
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "e2fsprogs"


def kernel_missing(reason: str) -> None:
    """Skip (developer machine) or fail (CI) because the kernel lacks something."""
    if REQUIRE_KERNEL:
        pytest.fail(f"FSNOTIFYD_REQUIRE_KERNEL=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _check_kernel() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices (/dev/loop-control missing)"
    if shutil.which("mkfs.ext4") is None:
        return "mkfs.ext4 not installed (e2fsprogs)"
    if "ext4" not in Path("/proc/filesystems").read_text():
        return "kernel has no ext4"
    return None


@pytest.fixture
def kernel() -> None:
    """Use in tests that need root, loop devices and ext4."""
    reason = _check_kernel()
    if reason:
        kernel_missing(reason)


@pytest.fixture
def e2fsprogs_fixtures() -> Path:
    if not (FIXTURES / "manifest.json").exists():
        kernel_missing(f"e2fsprogs fixtures not found at {FIXTURES}")
    return FIXTURES

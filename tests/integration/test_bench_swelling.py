"""bench/image_swelling.py runs: each workload churns a small real VE and the figures come out.

A smoke run only (128 MiB, 0.5x): the bench's figures are measured by running it, not here.
The VE is created, attached, mounted and removed by the bench's own ``VE`` (its exit takes it
down however the run ends); the test checks nothing of it is left.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from fsnotifyd.image import attach as A

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(120)]

BENCH = Path(__file__).resolve().parents[2] / "bench"
MiB = 1 << 20


@pytest.fixture
def bench(kernel):
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        from tests.conftest import kernel_missing

        kernel_missing("no /dev/fuse or fusermount3 (Debian fuse3)")
    sys.path.insert(0, str(BENCH))
    try:
        import image_swelling

        yield image_swelling
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("workload", ["small", "logs", "rewrite"])
def test_each_workload_churns_and_measures(bench, workload):
    work = Path(tempfile.mkdtemp(prefix="fsnd-bench-smoke-"))
    try:
        pool = memoryview(os.urandom(4 * MiB))
        r = bench.run_one(work, 128 * MiB, 0.5, workload, bench.MODES["fstrim+compact"], bench.Setup(),
                          seed=1, pool=pool, sync_every=8 * MiB)
        assert r.skipped is None
        assert r.samples[-1].written >= 64 * MiB and r.samples[-1].checkpoint
        last = r.samples[-1]
        assert last.after is not None and last.after.allocated <= last.fig.allocated
        assert 0 < last.fig.df_used and last.fig.used >= last.fig.df_used  # the bitmaps see all df sees
        run_dir = work / f"{workload}-fstrim_compact-thin.run"
        assert A.attached(str(run_dir)) == []
        assert not any(work.iterdir()), list(work.iterdir())
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_the_repack_mode_runs_a_pass_at_the_checkpoint(bench):
    work = Path(tempfile.mkdtemp(prefix="fsnd-bench-smoke-"))
    try:
        pool = memoryview(os.urandom(4 * MiB))
        r = bench.run_one(work, 128 * MiB, 0.5, "small", bench.MODES["repack"], bench.Setup(),
                          seed=1, pool=pool, sync_every=8 * MiB)
        last = r.samples[-1]
        assert "repack_bytes_moved" in last.maint, last.maint
        assert last.after.fragmentation <= last.fig.fragmentation
        assert not any(work.iterdir()), list(work.iterdir())
    finally:
        shutil.rmtree(work, ignore_errors=True)

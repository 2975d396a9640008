"""The closed loop's first step on the real kernel: a daemon sees an image-backed VE (created and
started with the image manager in the daemon's own state directory) and its ``fs.alloc`` events
carry the thinness figures of that image, agreeing with ``thinness.measure_image`` read beside
it. Cleans up the VE, its attachment and the daemon also when it fails."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import textwrap
import time

import pytest

from fsnotifyd.rules.engine import event_time
from tests.conftest import kernel_missing
from tests.rigs.daemon import RunningDaemon

pytestmark = pytest.mark.kernel
MiB = 1 << 20


@pytest.fixture
def fuse_ready(bpf_ready):
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        kernel_missing("no FUSE (/dev/fuse, fusermount3 from fuse3)")
    for tool in ("e2fsck", "mkfs.ext4"):
        if shutil.which(tool) is None:
            kernel_missing(f"{tool} not installed (e2fsprogs)")


def churn(root: str, seed: int) -> None:
    """Files of 4 KiB-1 MiB, a third deleted, written back: partly used clusters."""
    rnd = random.Random(seed)
    names = []
    for i in range(300):
        p = os.path.join(root, f"f{seed}-{i}")
        with open(p, "wb") as f:
            f.write(os.urandom(rnd.choice((4096, 32768, 262144, MiB))))
        names.append(p)
    for p in rnd.sample(names, len(names) // 3):
        os.unlink(p)
    os.sync()


def test_fs_alloc_carries_the_image_figures(fuse_ready, tmp_path):
    from fsnotifyd.image import attach, thinness
    from fsnotifyd.ve import lifecycle

    d = RunningDaemon(tmp_path / "d", extra_config=textwrap.dedent("""\
        sources:
          bpf_alloc: {interval: 0.5, figures_interval: 1}
        """))
    sd = str(d.state_dir)
    with d:
        try:
            rec = lifecycle.create(sd, "116", 256 * MiB, mountpoint=str(tmp_path / "root116"))
            rec = lifecycle.start(sd, "116")
            stream = d.stream(["fs.alloc"])
            try:
                churn(rec.mountpoint, 1)
                churn(rec.mountpoint, 2)
                synced = time.time()
                # The figures of a measurement that began after the data was written back.
                got = stream.wait_for(
                    lambda e: e["ve"] == "116" and "figures" in e["details"]
                    and event_time(e) - e["details"]["figures"]["age_s"] - e["details"]["figures"]["measure_s"]
                    > synced + 0.5, timeout=30)
            finally:
                stream.close()
            assert got, "no fs.alloc with figures measured after the write-back"
            live = got[-1]["details"]["figures"]
            direct = thinness.measure_image(rec.mountpoint, rec.image).as_dict()
            status = d.status()
        finally:
            with contextlib.suppress(Exception):
                lifecycle.stop(sd, "116")
            for a in attach.attached(os.path.join(sd, "run")):
                attach.detach(a, run_dir=os.path.join(sd, "run"))
    assert live["from_image"] is True and live["cluster"] == direct["cluster"]
    for k in ("garbage", "fragmentation", "swelling", "df_ratio"):
        assert live[k] > 0.5, live
    # Within reason: the daemon reads without a syncfs and the BAT as last flushed, and the
    # filesystem may have written a few metadata blocks between the two readings.
    assert abs(live["holding"] - direct["holding"]) <= max(3, direct["holding"] // 50), (live, direct)
    assert abs(live["used"] - direct["used"]) <= max(4 * MiB, direct["used"] // 50), (live, direct)
    assert abs(live["allocated"] - direct["allocated"]) <= max(3, direct["allocated"] // 50), (live, direct)
    assert live["fragmentation"] == pytest.approx(direct["fragmentation"], abs=0.05)
    assert live["garbage"] == pytest.approx(direct["garbage"], abs=0.05)
    alloc = status["sources"]["bpf_alloc"] if "bpf_alloc" in status.get("sources", {}) else None
    assert alloc is None or alloc.get("figures_failed", 0) == 0, alloc

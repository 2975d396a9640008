"""What the image benchmarks share: running a command, and the machine facts they print."""

from __future__ import annotations

import os
import platform
import subprocess
import time


def sh(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, text=True, capture_output=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip() or r.returncode}")
    return r


def machine_facts(workdir: str) -> str:
    fs = sh("findmnt", "-n", "-o", "SOURCE,FSTYPE", "--target", workdir, check=False).stdout.split()
    return (f"kernel {platform.release()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M:%S %z')}, "
            f"work dir {workdir} on {' '.join(fs) or '?'}")

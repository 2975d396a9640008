"""Files with known content: written and synced, digested, churned to age a filesystem."""

from __future__ import annotations

import os
from pathlib import Path


def write_synced(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path`` and fsync them; returns their SHA-256."""
    import hashlib

    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def sha256_of(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def churn(root: str | Path, *, rounds: int, fill: float = 0.5, delete: float = 0.65, seed: int = 1,
          min_size: int = 1 << 10, max_size: int = 2 << 20, subdir: str = "churn") -> list[Path]:
    """The issue-16 churn: each round writes a tree of files of ``min_size``..``max_size``
    (log-uniform) until the filesystem is ``fill`` used, then deletes ``delete`` of the live
    files; ``syncfs`` between steps so the data is written back (with delayed allocation a
    file deleted before write-back never gets blocks, and the churn would measure nothing).
    Returns the files left."""
    import math
    import random

    from fsnotifyd.image.thinness import syncfs

    rnd = random.Random(seed)
    root = Path(root)
    live: list[Path] = []
    st = os.statvfs(root)
    total = st.f_blocks * st.f_frsize
    n = 0
    for r in range(rounds):
        d = root / subdir / f"r{seed}-{r}"
        d.mkdir(parents=True, exist_ok=True)
        while True:
            st = os.statvfs(root)
            if (st.f_blocks - st.f_bfree) * st.f_frsize >= fill * total:
                break
            size = int(math.exp(rnd.uniform(math.log(min_size), math.log(max_size))))
            p = d / f"f{n}"
            n += 1
            p.write_bytes(rnd.randbytes(size))
            live.append(p)
            if n % 200 == 0:
                syncfs(str(root))
        syncfs(str(root))
        rnd.shuffle(live)
        k = int(len(live) * delete)
        for p in live[:k]:
            p.unlink()
        live = live[k:]
        syncfs(str(root))
    return live


def tree_digests(root: str | Path, skip: tuple[str, ...] = (".fsnotifyd-balloon",)) -> dict[str, str]:
    """SHA-256 of every regular file under ``root`` (relative path -> digest)."""
    import hashlib

    out = {}
    root = Path(root)
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if rel in skip or p.is_symlink():
                continue
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out

"""One writer per image: an exclusive ``flock`` on the image directory.

The exporter holds it while attached writable; offline operations (compact, merge, grow, cut,
check --repair, snapshot of a detached image) take it for their duration, so none of them can
run on an image another process is writing (their BATs in memory would overwrite each other).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

from ..errors import ImageError


@contextlib.contextmanager
def exclusive(image_dir: str, what: str) -> Iterator[None]:
    try:
        fd = os.open(image_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise ImageError(f"cannot open image directory: {e.strerror}", file=image_dir) from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ImageError(f"cannot {what}: the image is in use by another process (attached writable, "
                             "or another operation)", file=image_dir) from None
        yield
    finally:
        os.close(fd)

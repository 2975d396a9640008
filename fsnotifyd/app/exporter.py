"""The image exporter's process: ``python -m fsnotifyd.app.exporter``, one per attached image.

Started by :func:`fsnotifyd.image.attach.attach`; what it serves and how is
:mod:`fsnotifyd.image.exporter`. Here is only the process's start: arguments, logging, exit code.
"""

from __future__ import annotations

import argparse
import sys

import structlog

from ..errors import FsnotifydError
from ..image import exporter
from .logging import configure_logging

log = structlog.get_logger("fsnotifyd.image.exporter")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fsnotifyd.app.exporter",
                                description=(exporter.__doc__ or "").split("\n")[0])
    p.add_argument("--image", required=True, help="image directory (holds DiskDescriptor.xml)")
    p.add_argument("--fuse-dir", required=True, help="where to mount the FUSE filesystem holding 'disk'")
    p.add_argument("--control", required=True, help="unix socket path for control requests")
    p.add_argument("--readonly", action="store_true")
    p.add_argument("--upto", default=None, help="serve the image as of this snapshot GUID (read-only)")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    configure_logging(args.log_level)
    try:
        return exporter.serve(args.image, args.fuse_dir, args.control, readonly=args.readonly, upto=args.upto)
    except (FsnotifydError, OSError) as e:
        log.error("exporter.failed", error=str(e), image=args.image)
        return 2


if __name__ == "__main__":
    sys.exit(main())

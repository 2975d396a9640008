"""Waiting on an attached image's exporter (root: a real attachment)."""

from __future__ import annotations

import time


def discards_settled(att: object, *, quiet: float = 1.0, limit: float = 30.0) -> None:
    """Wait until no discard has reached the image's exporter for ``quiet`` seconds (at most
    ``limit``), then flush it: ext4 sends online discards from a work queue after the journal
    commit, not inside ``sync``, so a figure taken at once would miss some."""
    from fsnotifyd.image import attach

    seen: object = None
    since = end = time.monotonic()
    end += limit
    while time.monotonic() < end:
        st = attach.status(att)["stats"]  # type: ignore[arg-type]
        now = (st["discards"], st["writes"])
        if now != seen:
            seen, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
        time.sleep(0.1)
    attach.control(att, {"op": "flush"})  # type: ignore[arg-type]

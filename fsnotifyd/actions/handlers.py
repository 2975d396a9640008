"""The handler of each action name, bound to where VEs are found."""

from __future__ import annotations

from functools import partial

from . import fsck, isolate, notify, shrink, snapshot
from .executor import Handler
from .target import Targets


def handlers(targets: Targets) -> dict[str, Handler]:
    return {
        "isolate": partial(isolate.run, targets=targets),
        "snapshot": partial(snapshot.run, targets=targets),
        "fsck": partial(fsck.run, targets=targets),
        "shrink": partial(shrink.run, targets=targets),
        "notify": notify.notify,
        "exec": notify.execute,
    }

"""jbd2's journal abort message (fs/jbd2/journal.c). Pure.

``Aborting journal on device D-INO.`` → ``fs.readonly`` with ``details.reason =
"journal_aborted"``: the filesystem on D goes read-only right after it.
"""

from __future__ import annotations

import re

from ..events import Kernel, Observation
from .kmsg import SOURCE, KmsgRecord, caller_pid, record_device

__all__ = ["PREFIX", "journal_abort", "journal_device"]

PREFIX = "Aborting journal on device "

_JOURNAL_ABORT = re.compile(r"Aborting journal on device (?P<dev>\S+?)\.?")
_JOURNAL_SUFFIX = re.compile(r"(?P<dev>.+)-\d+")
_DM_NAME = re.compile(r"dm-\d+")


def journal_abort(rec: KmsgRecord, msg: str, when: float) -> Observation | None:
    m = _JOURNAL_ABORT.fullmatch(msg)
    if m is None:
        return None
    journal = m.group("dev")
    return Observation(
        source=SOURCE,
        kind="fs.readonly",
        time=when,
        device=record_device(journal_device(journal), rec.props),
        kernel=Kernel(pid=caller_pid(rec.caller), message=msg),
        details={"reason": "journal_aborted", "journal": journal},
    )


def journal_device(journal: str) -> str:
    """The block device of a jbd2 journal name: ``loop0-8`` (internal journal, inode 8) → ``loop0``.

    jbd2 names an internal journal ``<bdev>-<inode>`` and an external one ``<bdev>``; a bare
    ``dm-N`` is therefore an external journal on device-mapper, not ``dm`` with inode N.
    """
    if _DM_NAME.fullmatch(journal):
        return journal
    m = _JOURNAL_SUFFIX.fullmatch(journal)
    return m.group("dev") if m else journal

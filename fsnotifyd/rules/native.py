"""Which implementation of the rules engine's per-event path runs.

The C module ``_decide`` (built by ``scripts/bootstrap.sh``) when :mod:`fsnotifyd.native`
loads it (built, not switched off, same ABI) and it was built from the same opcode table as
:mod:`.decide`; else :mod:`.decide`, the Python reference, which decides identically at about
half the speed. ``reason`` says why the reference runs.
"""

from __future__ import annotations

from types import ModuleType

from .. import native as loader
from . import decide

ABI = 1  # _decide.c's FSNOTIFYD_ABI


def _same_tables(module: ModuleType) -> str | None:
    if module.OPS != decide.OPS or module.MAX_FACTS != decide.MAX_FACTS:
        return "the C core was built from other sources than decide.py; rebuild it"
    return None


_loaded = loader.load("fsnotifyd.rules._decide", ABI, _same_tables)
impl: ModuleType = _loaded.module or decide
reason = _loaded.reason
NATIVE = reason is None

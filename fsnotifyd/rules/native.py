"""Which implementation of the rules engine's per-event path runs.

The C module ``_decide`` (built by ``scripts/bootstrap.sh``) when it is importable and was
built from the same opcode table as :mod:`.decide`; else :mod:`.decide`, the Python reference,
which decides identically at about half the speed. ``FSNOTIFYD_PURE_PYTHON=1`` forces the
reference (to rule the C module out when chasing a bug). ``reason`` says why the reference runs.
"""

from __future__ import annotations

import os
from types import ModuleType

from . import decide


def _choose() -> tuple[ModuleType, str | None]:
    if os.environ.get("FSNOTIFYD_PURE_PYTHON"):
        return decide, "FSNOTIFYD_PURE_PYTHON is set"
    try:
        from . import _decide  # type: ignore[attr-defined]
    except ImportError as e:
        return decide, f"the C core is not built ({e}); run scripts/bootstrap.sh"
    if _decide.OPS != decide.OPS or _decide.MAX_FACTS != decide.MAX_FACTS:
        return decide, "the C core was built from other sources than decide.py; rebuild it"
    return _decide, None


impl, reason = _choose()
NATIVE = reason is None

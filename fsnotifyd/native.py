"""The one loader of fsnotifyd's C modules, each the fast twin of a Python reference.

=========================  ==========================  ==================================
C module                   Python side (the reference)  what it speeds up
=========================  ==========================  ==================================
``rules/_decide.c``        ``rules/decide.py``          the rules engine's per-event path
``replay/_jsonl.c``        ``replay/reader.py``         reading JSONL journals for replay
``image/_fastio.c``        ``image/exporter.py``        the image exporter's mapped I/O
=========================  ==========================  ==================================

One switch turns them all off: ``FSNOTIFYD_NO_C=1`` (to rule the C code out when chasing a
bug). The earlier switches still work: ``FSNOTIFYD_PURE_PYTHON=1`` for the first two,
``FSNOTIFYD_FASTIO=0`` for the image data path.

One ABI check: each module exports ``ABI``, the version of the interface between it and its
Python side, which the Python side names when it asks for the module (:func:`load`). A module
that is not built, or whose ``ABI`` differs (built from other sources: rebuild with
``scripts/bootstrap.sh``), is not used: the Python side runs, with one warning per module and
process. A switch is a choice, not a fault: nothing is said then.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import structlog

SWITCH = "FSNOTIFYD_NO_C"

# module -> (an earlier switch that turns it off, the value that does; "" = any non-empty value)
EARLIER_SWITCHES: dict[str, tuple[str, str]] = {
    "fsnotifyd.rules._decide": ("FSNOTIFYD_PURE_PYTHON", ""),
    "fsnotifyd.replay._jsonl": ("FSNOTIFYD_PURE_PYTHON", ""),
    "fsnotifyd.image._fastio": ("FSNOTIFYD_FASTIO", "0"),
}

@dataclass(frozen=True)
class Loaded:
    module: ModuleType | None  # None: the Python side runs
    reason: str | None = None  # why it runs (None when the C module is used)


def switched_off(name: str) -> str | None:
    """The switch that turns the C module ``name`` off now, as a reason, or None."""
    if (value := os.environ.get(SWITCH, "")) not in ("", "0"):
        return f"{SWITCH}={value} is set"
    var, off = EARLIER_SWITCHES.get(name, ("", ""))
    current = os.environ.get(var, "") if var else ""
    if current and (off == "" or current == off):
        return f"{var}={current} is set"
    return None


def load(name: str, abi: int, check: Callable[[ModuleType], str | None] | None = None) -> Loaded:
    """The C module ``name`` if it may run, is built and speaks ABI version ``abi``; ``check``
    may refuse it for a further reason (returned as a string)."""
    off = switched_off(name)
    return Loaded(None, off) if off is not None else _probe(name, abi, check)


@functools.cache  # what is built does not change while the process runs: one probe, one warning
def _probe(name: str, abi: int, check: Callable[[ModuleType], str | None] | None) -> Loaded:
    found = _import(name, abi, check)
    if found.reason is not None:
        _warn(name, found.reason)
    return found


def _import(name: str, abi: int, check: Callable[[ModuleType], str | None] | None) -> Loaded:
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        return Loaded(None, f"not built ({e}); run scripts/bootstrap.sh")
    built = getattr(module, "ABI", None)
    if built != abi:
        what = "an older build without an ABI number" if built is None else f"built for ABI {built}"
        return Loaded(None, f"{what}, the Python side speaks {abi}: built from other sources; "
                            "rebuild it (scripts/bootstrap.sh)")
    reason = check(module) if check is not None else None
    return Loaded(None, reason) if reason is not None else Loaded(module)


def _warn(name: str, reason: str) -> None:
    # Often at import time, before the CLI has set logging up: structlog's default would
    # print to stdout, where results go, so then the warning goes to stderr the standard way.
    if structlog.is_configured():
        structlog.get_logger("fsnotifyd.native").warning("native.fallback", module=name, reason=reason,
                                                         running="python")
    else:
        warnings.warn(f"fsnotifyd: C module {name} not used: {reason}; the Python implementation runs",
                      RuntimeWarning, stacklevel=4)

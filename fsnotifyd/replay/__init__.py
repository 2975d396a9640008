"""Replay: recorded fsnotifyd events and plain kernel logs as one ordered event stream.

:mod:`.reader` turns files of either kind into events through the daemon's own kmsg classifier
and correlator, in event time, deterministically; the text formats it reads (``dmesg``,
``journalctl -k``) are parsed by :mod:`fsnotifyd.kernel.logtext`, re-exported here for the
callers of the replay; :mod:`.report` says what was skipped and why; :mod:`.vemap` reads the VE map.
"""

from ..kernel.logtext import KernelLine, detect_format, parse_entry, parse_line
from .reader import read_events
from .report import ReadReport
from .vemap import load_ve_map

__all__ = ["KernelLine", "ReadReport", "detect_format", "load_ve_map", "parse_entry", "parse_line",
           "read_events"]

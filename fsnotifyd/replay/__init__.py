"""Replay: recorded fsnotifyd events and plain kernel logs as one ordered event stream.

:mod:`.kerneltext` parses ``dmesg`` / ``journalctl -k`` text into kmsg records (pure);
:mod:`.reader` turns files of either kind into events through the daemon's own kmsg classifier
and correlator, in event time, deterministically.
"""

from .kerneltext import KernelLine, ReadReport, detect_format, parse_entry, parse_line
from .reader import load_ve_map, read_events

__all__ = ["KernelLine", "ReadReport", "detect_format", "load_ve_map", "parse_entry", "parse_line",
           "read_events"]

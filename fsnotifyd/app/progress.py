"""One progress line on the terminal for the commands that can take minutes.

The code below ``app/`` reports through a plain callback, ``progress(stage, done, total)``
(see :data:`fsnotifyd.image.transfer.ProgressFn`); this module turns the calls into a line
redrawn in place on stderr: ``import copy  1.2G/4.0G  30 %  210M/s  ETA 14 s``.

Drawn only when both stdout and stderr are terminals. stdout not a terminal (a pipe, a log,
``--json`` taken by a script) means nobody watches the screen; stderr not a terminal means the
carriage returns would end up in a file. Redrawn at most ``RATE_HZ`` times a second, whatever
the rate of calls (a copy calls once per cluster), and the line is cleared when the command
ends, so the result printed after it starts on a clean line.
"""

from __future__ import annotations

import io
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from ..image.info import human

RATE_HZ = 5.0
CLEAR = "\r\x1b[K"  # to the line's start, erase to its end


def _amount(n: float, unit: str) -> str:
    return human(int(n)) if unit == "B" else f"{int(n)}"


def _duration(s: float) -> str:
    s = int(s + 0.5)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def render(label: str, stage: str, done: int, total: int, unit: str, seconds: float, extra: str = "") -> str:
    """The text of one progress line (pure: tests and every caller draw the same line)."""
    rate = done / seconds if seconds > 0 else 0.0
    head = label if stage in ("", label) else f"{label} {stage}"  # not "compact compact"
    parts = [head]
    suffix = "" if unit == "B" else f" {unit}"
    if unit and total > 0:
        parts.append(f"{_amount(done, unit)}/{_amount(total, unit)}{suffix}")
    elif unit:
        parts.append(f"{_amount(done, unit)}{suffix}")
    if total > 0:
        parts.append(f"{min(100.0, 100.0 * done / total):.0f} %")
    if seconds >= 0.5 and done:
        if unit:  # unit "": the tool's own steps, worth a percentage and an ETA only
            parts.append(f"{human(int(rate))}/s" if unit == "B" else f"{rate:.0f} {unit}/s")
        if total > done:
            parts.append(f"ETA {_duration((total - done) / rate)}")
    if extra:
        parts.append(extra)
    return "  ".join(parts)


@dataclass
class Progress:
    """A progress line for one command; call it as the image code's ``progress`` callback,
    :meth:`close` (or leave the ``with`` block) when the command ends."""

    label: str
    unit: str = "B"  # "B": amounts in bytes (1.2G); "": a percentage only; else a count of that unit
    out: TextIO = field(default_factory=lambda: sys.stderr)
    clock: Callable[[], float] = time.monotonic
    interval: float = 1.0 / RATE_HZ
    width: int = 0  # the terminal's columns (0: asked from out); longer lines are cut
    extra: Callable[[float], str] | None = None  # more text for the line, given the stage's seconds
    _stage: str = ""
    _start: float = 0.0
    _last_draw: float = -1e9
    _drawn: bool = False
    _text: str = ""
    draws: int = 0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = self.clock()
        if stage != self._stage or not self._start:
            self._stage, self._start = stage, now  # a stage's rate and ETA are its own
        final = total > 0 and done >= total
        if now - self._last_draw < self.interval and not final:
            return
        self._last_draw = now
        seconds = now - self._start
        line = render(self.label, stage, done, total, self.unit, seconds,
                      self.extra(seconds) if self.extra is not None else "")
        width = self.width or _columns(self.out)
        line = line[:max(10, width - 1)]
        if line == self._text:
            return  # the same figures again (the final call after a last draw)
        self._text = line
        # A stage drawn at its end is cleared at once: what the command prints next (a log
        # event of the next step, the result) starts on a clean line.
        self.out.write(CLEAR + line + (CLEAR if final else ""))
        self.out.flush()
        self._drawn = not final
        self.draws += 1

    def due(self) -> bool:
        """Whether a call now would draw (for callers whose figures cost something to get)."""
        return self.clock() - self._last_draw >= self.interval

    def close(self) -> None:
        self._text = ""  # whatever comes next is drawn again
        if self._drawn:
            self.out.write(CLEAR)
            self.out.flush()
            self._drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Clearing(io.TextIOBase):
    """``out`` for results printed while a progress line is up (on the same terminal): every
    write clears the line first, which the next update draws again below the new text."""

    def __init__(self, line: Progress, out: TextIO) -> None:
        self.line, self.out = line, out

    def write(self, s: str) -> int:
        self.line.close()
        return self.out.write(s)

    def flush(self) -> None:
        self.out.flush()


def _columns(out: TextIO) -> int:
    try:
        return os.get_terminal_size(out.fileno()).columns or 80  # 0: a pty nobody sized
    except (OSError, ValueError, AttributeError):
        return 80


def on_terminal() -> bool:
    """Whether a progress line would be seen: stdout and stderr both terminals."""
    try:
        return sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def reporter(label: str, unit: str = "B", *, extra: Callable[[float], str] | None = None) -> Progress | None:
    """A :class:`Progress` when someone watches the terminal, else None (the image code then
    reports nothing and costs nothing)."""
    return Progress(label, unit, extra=extra) if on_terminal() else None

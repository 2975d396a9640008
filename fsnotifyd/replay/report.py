"""What reading logs skipped and why: the replay's account of its input."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ReadReport"]


@dataclass
class ReadReport:
    """What reading logs skipped and why; filled in while :func:`read_events` is iterated."""

    max_examples: int = 5
    files: dict[str, str] = field(default_factory=dict)  # path → detected format
    lines: int = 0
    entries: int = 0  # kernel text lines understood
    ignored: int = 0  # blank lines, journalctl markers, continuation lines
    observations: int = 0  # entries the kmsg classifier recognised
    jsonl_events: int = 0
    events: int = 0  # events produced (both kinds of input)
    skipped: int = 0  # lines that were neither: garbage, bad JSON, not an event
    examples: list[str] = field(default_factory=list)  # "path:line: reason: text"
    monotonic_without_boot_time: bool = False

    def skip(self, path: str, lineno: int, reason: str, text: str) -> None:
        self.skipped += 1
        if len(self.examples) < self.max_examples:
            shown = text if len(text) <= 80 else text[:77] + "..."
            self.examples.append(f"{path}:{lineno}: {reason}: {shown!r}")

    def summary(self) -> list[str]:
        out = []
        for path, fmt in self.files.items():
            out.append(f"{path}: read as {fmt}")
        out.append(f"{self.lines} lines: {self.entries} kernel log entries ({self.observations} recognised), "
                   f"{self.jsonl_events} JSONL events, {self.ignored} ignored, {self.skipped} skipped; "
                   f"{self.events} events")
        if self.skipped:
            out.append(f"skipped lines (first {len(self.examples)}): {'; '.join(self.examples)}")
        if self.monotonic_without_boot_time:
            out.append("dmesg stamps are seconds since boot and no boot time was given: event times "
                       "are relative (1970-01-01 + uptime)")
        return out


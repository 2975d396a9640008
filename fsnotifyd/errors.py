"""Every error fsnotifyd raises derives from :class:`FsnotifydError`."""

from __future__ import annotations


class FsnotifydError(Exception):
    """Base of all fsnotifyd errors."""


class ConfigError(FsnotifydError):
    """A configuration file is wrong; names the file, line and field."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.file, self.line, self.field = file, line, field
        where = ":".join(str(p) for p in (file, line) if p is not None)
        prefix = f"{where}: " if where else ""
        suffix = f" (field {field!r})" if field else ""
        super().__init__(f"{prefix}{message}{suffix}")


class SourceUnavailable(FsnotifydError):
    """A source cannot run on this host; the daemon degrades and says why."""

    def __init__(self, reason: str, hint: str | None = None) -> None:
        self.reason, self.hint = reason, hint
        super().__init__(reason if hint is None else f"{reason} (hint: {hint})")


class SourceFailed(FsnotifydError):
    """A source failed in a way worth retrying with backoff."""

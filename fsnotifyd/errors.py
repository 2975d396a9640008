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


class UsageError(FsnotifydError):
    """The command line asks for something that cannot be (a bad size, a negative budget, an
    option that does not fit the verb): exit 2, as argparse's own usage errors."""


class SourceUnavailable(FsnotifydError):
    """A source cannot run on this host; the daemon degrades and says why."""

    def __init__(self, reason: str, hint: str | None = None) -> None:
        self.reason, self.hint = reason, hint
        super().__init__(reason if hint is None else f"{reason} (hint: {hint})")


class SourceFailed(FsnotifydError):
    """A source failed in a way worth retrying with backoff."""


class RuleError(FsnotifydError):
    """One mistake in a rules file: ``FILE:LINE:COLUMN: message (field 'x.y'); expected ...``.

    ``line`` and ``column`` are 1-based and point at the offending key or value; both are
    ``None`` when the file itself could not be read.
    """

    def __init__(self, message: str, *, file: str, line: int | None = None, column: int | None = None,
                 field: str | None = None, expected: str | None = None) -> None:
        self.message, self.file, self.line, self.column = message, file, line, column
        self.field, self.expected = field, expected
        where = ":".join(str(p) for p in (file, line, column) if p is not None)
        text = f"{where}: {message}"
        if field:
            text += f" (field {field!r})"
        if expected:
            text += f"; expected {expected}"
        super().__init__(text)


class RuleErrors(FsnotifydError):
    """Every mistake found in a set of rules files, one :class:`RuleError` per line of ``str()``."""

    def __init__(self, errors: list[RuleError]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


class ImageError(FsnotifydError):
    """An image file or disk descriptor is wrong or cannot be used: names the file, and the
    field (header field, ``bat[N]``, descriptor element) when one is at fault."""

    def __init__(self, message: str, *, file: str | None = None, field: str | None = None) -> None:
        self.message, self.file, self.field = message, file, field
        prefix = f"{file}: " if file else ""
        suffix = f" (field {field!r})" if field else ""
        super().__init__(f"{prefix}{message}{suffix}")


class FsckFailed(ImageError):
    """e2fsck could not repair a filesystem (exit status 4 and up, or killed): it must not be
    resized or mounted read-write. Carries the command and its exit status."""

    def __init__(self, message: str, *, command: tuple[str, ...], exit_code: int, decoded: list[str],
                 file: str | None = None) -> None:
        self.command, self.exit_code, self.decoded = command, exit_code, decoded
        super().__init__(message, file=file)

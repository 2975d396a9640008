"""What every CLI verb shares: its exit codes and how it prints its result.

Exit codes (docs/cli.md has the table): 0 ok; 1 failed (a check found problems, an operation
failed, the daemon could not be reached); 2 usage or configuration error (argparse's own code).
With ``--json`` the result is one JSON document on stdout and nothing else is printed there;
messages and errors stay on stderr, so ``fsnotifyd ... --json | jq`` never sees prose.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from typing import Any

OK, FAILED, USAGE = 0, 1, 2

# What each code means: the man page's EXIT STATUS, and docs/cli.md's table (with the per-verb
# notes there); tests/unit/test_shelldocs.py keeps the two the same.
EXIT_STATUS = (
    (OK, "ok: the command did what it was asked, or the check found nothing wrong"),
    (FAILED, "failed: the check found problems, the operation failed (a bad image, a VE that does not exist "
             "or is not running, mkfs or e2fsck failing, the host refusing a file), or the daemon could not "
             "be reached"),
    (USAGE, "usage or configuration error: a bad option or value (a size, a budget, a label, a boot time), "
            "a config or rules file that is not valid or is refused, a file named on the command line that "
            "cannot be opened; nothing was done"),
)


def as_json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def emit(args: argparse.Namespace, result: Any, text: str | Iterable[str] | None = None) -> None:
    """The result as JSON with ``--json``, else ``text`` (a line, or lines) when there is any."""
    if as_json(args):
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    elif isinstance(text, str):
        print(text)
    elif text is not None:
        for line in text:
            print(line)


def error(message: str) -> None:
    print(f"fsnotifyd: {message}", file=sys.stderr)


def json_flag(sp: argparse.ArgumentParser, help: str = "print the result as one JSON document") -> None:  # noqa: A002
    sp.add_argument("--json", action="store_true", help=help)


class _CurrentStderr:
    """Whatever ``sys.stderr`` is when a line is written (pytest's capture swaps it per test)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def logs_to_stderr() -> None:
    """structlog's default prints to stdout, where a verb's log events (``image.attached``, ...)
    would land in the middle of its result, and in its --json. Only the logger factory is set:
    the rest of the set-up is structlog's default, or ``configure_logging``'s where that ran."""
    import structlog

    # _CurrentStderr has the write/flush PrintLogger uses, not the whole TextIO it is typed to take
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()))  # type: ignore[arg-type]

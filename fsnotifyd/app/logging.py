"""structlog set-up: key=value on a terminal, JSON lines otherwise (journald, files); on
journald's stream each line starts with its ``<N>`` priority (see ``journalstream``)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import structlog

from .journalstream import PriorityPrefix, stderr_is_journal


def _stderr_fd() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):  # replaced by an object without a real fd
        return None


def configure_logging(level: str = "info") -> None:
    renderer: Callable[[Any, str, Any], str | bytes] = (
        structlog.dev.ConsoleRenderer(colors=False)
        if sys.stderr.isatty()
        else structlog.processors.JSONRenderer()
    )
    fd = _stderr_fd()
    if fd is not None and stderr_is_journal(fd):
        renderer = PriorityPrefix(renderer)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )

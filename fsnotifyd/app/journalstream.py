"""Is standard error journald's stdout stream, and the ``<N>`` prefix that gives a line its
priority there (sd-daemon(3); journald reads it with the unit's ``SyslogLevelPrefix=yes``, the
default).

Without the prefix journald files every line at the unit's ``SyslogLevel=`` (info), and
``journalctl -u fsnotifyd -p err`` misses the daemon's errors. But a prefix anywhere else is
noise in a file or a terminal, so it is only written when stderr is the stream systemd set up:
``JOURNAL_STREAM`` holds that stream's ``st_dev:st_ino`` (systemd.exec(5)), and the variable
alone proves nothing, because processes inherit it even after their stderr was redirected
(an image exporter's stderr is a log file under the state directory).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from ..events import SEVERITY_PRIORITY

# structlog's level names (add_log_level maps exception -> error, warn -> warning) are the event
# severities' names: their syslog(3) priorities are the ones the syslog sink writes.
PRIORITIES: Mapping[str, int] = SEVERITY_PRIORITY

_DEV_INO = re.compile(r"([0-9]+):([0-9]+)")


def stderr_is_journal(fd: int = 2, environ: Mapping[str, str] = os.environ) -> bool:
    """True when ``fd`` is the journal stream ``JOURNAL_STREAM`` names."""
    m = _DEV_INO.fullmatch(environ.get("JOURNAL_STREAM", ""))
    if m is None:
        return False
    try:
        st = os.fstat(fd)
    except OSError:  # closed (a daemonised child): nothing to prefix for
        return False
    return (st.st_dev, st.st_ino) == (int(m.group(1)), int(m.group(2)))


class PriorityPrefix:
    """Wraps structlog's final renderer: ``<N>`` + the rendered line. Needs the ``level`` key
    (``add_log_level``); a level it does not know gets no prefix, i.e. the unit's default."""

    def __init__(self, renderer: Callable[[Any, str, Any], str | bytes]) -> None:
        self.renderer = renderer

    def __call__(self, logger: Any, method_name: str, event_dict: Any) -> str:
        priority = PRIORITIES.get(event_dict.get("level", ""))
        rendered = self.renderer(logger, method_name, event_dict)
        # structlog's JSONRenderer may give bytes (with a bytes-returning ``serializer``).
        line = rendered.decode() if isinstance(rendered, bytes) else rendered
        return line if priority is None else f"<{priority}>{line}"

"""``--since`` / ``--until`` values: a duration back from now (``1h``, ``30m``, ``1h30m``,
``90s``) or a point in time (ISO 8601 / RFC 3339; without a zone, this machine's local time)."""

from __future__ import annotations

from datetime import datetime

from ..rules.loader import parse_duration


def parse_when(value: str, now: float) -> float:
    """Epoch seconds for ``value``; :class:`ValueError` saying what is accepted otherwise."""
    text = value.strip()
    seconds = parse_duration(text) if _is_duration(text) else None
    if seconds is not None:
        return now - seconds
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"{value!r} is neither a duration (1h, 30m, 1h30m, 90s, 2d) nor an ISO time "
                         "(2026-12-02T06:00:00Z, 2026-12-02 07:00)") from None
    return dt.timestamp()  # a naive time is local time, as the operator reads the clock


def _is_duration(text: str) -> bool:
    # "2026-12-02" starts with digits too: only a string of number+unit groups is a duration.
    return parse_duration(text) is not None and not any(c in text for c in "-:T ")

"""Values a sink setting may take, checked in one place for the config loader and the sinks.

The config loader reports a failure with the file and line; a sink built from code (tests, the
replay tool) gets the same ValueError text. Pure, and importing nothing from fsnotifyd: the
sinks import the config, so the config cannot import the sinks.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import SplitResult, urlsplit

FACILITIES: Mapping[str, int] = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7,
    "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, **{f"local{i}": 16 + i for i in range(8)},
}


def facility_code(name: str) -> int:
    """The syslog facility number of ``name``; ValueError naming the valid ones otherwise."""
    try:
        return FACILITIES[name]
    except KeyError:
        raise ValueError(
            f"unknown syslog facility {name!r}; expected one of {', '.join(FACILITIES)}"
        ) from None


def webhook_url(url: str) -> SplitResult:
    """The parts of a webhook URL; ValueError unless it is http(s) with a host, a valid port
    and no credentials (URLs get logged; the token comes from ``token_file``)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
    try:
        _ = parts.port  # parsed on access: raises for a bad port
    except ValueError as e:
        raise ValueError(f"bad port in {url!r}: {e}") from None
    # "https://@host/" has an empty user name: refuse it too rather than guess what was meant.
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials do not belong in the URL (they would be logged); use token_file")
    return parts

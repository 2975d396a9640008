"""Refuse configuration that someone other than root could have written.

The daemon runs as root and its rules run actions (remount, freeze, fsck, shrink) on every VE:
whoever can write its config or rules files can make root do those things. So, like sshd's
StrictModes, the daemon checks the file and every directory above it before reading it: each
must be owned by root and not writable by group or others, except that a group-writable entry
is fine when the group is root's, and a world-writable directory is fine when it is sticky
(``/tmp``), since there only the owner (root) can replace a root-owned entry.
"""

from __future__ import annotations

import os
import stat

from .errors import ConfigError


def untrusted_reason(path: str) -> str | None:
    """Why ``path`` could have been written by someone other than root, or None."""
    real = os.path.realpath(path)
    seen: set[str] = set()
    # The path as given and the path it resolves to: a symlink in a user's directory pointing
    # at a root-owned file is still a file that user chooses.
    for p in _with_ancestors(os.path.abspath(path)) + _with_ancestors(real):
        if p in seen:
            continue
        seen.add(p)
        try:
            st = os.lstat(p)
        except OSError as e:
            return f"cannot check {p}: {e.strerror}"
        if stat.S_ISLNK(st.st_mode):
            continue  # a symlink's own mode means nothing; its directory and target are checked
        what = "directory" if stat.S_ISDIR(st.st_mode) else "file"
        if st.st_uid != 0:
            return f"{what} {p} is owned by uid {st.st_uid}, not root"
        if st.st_mode & stat.S_IWOTH and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
            return f"{what} {p} is writable by everyone (mode {stat.S_IMODE(st.st_mode):04o})"
        if st.st_mode & stat.S_IWGRP and st.st_gid != 0:
            return f"{what} {p} is writable by group {st.st_gid} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _with_ancestors(path: str) -> list[str]:
    out = [path]
    while True:
        parent = os.path.dirname(path)
        if parent == path:
            return out
        out.append(parent)
        path = parent


def require_root_only(path: str, what: str) -> None:
    """Raise ConfigError naming the file when the daemon (running as root) must not trust it."""
    if os.geteuid() != 0:
        return  # a non-root daemon can do nothing a writer could not do already
    reason = untrusted_reason(path)
    if reason is not None:
        raise ConfigError(f"refusing {what}: {reason}; only root may be able to write it "
                          f"(fix: chown root:root and chmod go-w)", file=path)

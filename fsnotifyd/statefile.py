"""A small JSON key → integer store that survives restarts and crashes.

Written whole to a temporary file, fsynced, renamed over the old one and the directory fsynced,
so a crash leaves either the old or the new state, never a torn file. A corrupt file is moved
aside (and said so) instead of stopping the daemon: its loss costs a repeated report, not a
missed one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field


@dataclass
class JsonStateStore:
    path: str
    _data: dict[str, int] = field(default_factory=dict)
    _dirty: bool = False
    load_error: str | None = None

    def __post_init__(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                raw = json.load(f)
            if not isinstance(raw, dict):
                raise ValueError("top level is not an object")
            self._data = {str(k): int(v) for k, v in raw.items() if isinstance(v, int)}
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            self.load_error = f"{self.path}: {e}; moved aside to {self.path}.corrupt"
            os.replace(self.path, self.path + ".corrupt")

    def get(self, key: str) -> int | None:
        return self._data.get(key)

    def set(self, key: str, value: int) -> None:
        if self._data.get(key) != value:
            self._data[key] = value
            self._dirty = True

    def flush(self) -> None:
        if not self._dirty:
            return
        write_json_atomic(self.path, self._data)
        self._dirty = False


def write_json_atomic(path: str, obj: object) -> None:
    """Write temp, fsync, rename over, fsync the directory: old or new, never torn."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_json(path: str) -> tuple[object | None, str | None]:
    """The JSON in ``path`` (None if absent), or an error moved aside like a corrupt ledger."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f), None
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as e:
        os.replace(path, path + ".corrupt")
        return None, f"{path}: {e}; moved aside to {path}.corrupt"

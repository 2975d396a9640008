"""The progress callback the long image operations take (no terminal code here: the CLI
draws it, see ``fsnotifyd/app/progress.py``)."""

from __future__ import annotations

from collections.abc import Callable

# progress(stage, done, total): ``stage`` a short word ("copy", "convert", "compact"), ``done``
# and ``total`` in the operation's unit (bytes, clusters); total 0 when not known.
ProgressFn = Callable[[str, int, int], None]

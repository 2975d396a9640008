"""fsnotifyd's version: the one place it is written.

pyproject.toml reads it from here (``[tool.setuptools.dynamic]``), so the wheel's metadata,
``fsnotifyd --version``, ``status``, the control socket's greeting, the webhook User-Agent and
``fsnotifyd_build_info`` all say the same, from a source tree or an installed wheel alike.
"""

from __future__ import annotations

__version__ = "0.1.0"

"""``python -m fsnotifyd``: the same CLI as the ``fsnotifyd`` command."""

import sys

from .cli import main

sys.exit(main())

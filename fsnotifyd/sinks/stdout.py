"""Events as JSON lines on standard output."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TextIO

from ..events import Event


@dataclass
class StdoutSink:
    stream: TextIO = sys.stdout
    name: str = "stdout"

    def publish(self, event: Event) -> None:
        self.stream.write(event.to_json() + "\n")
        self.stream.flush()

    def close(self) -> None:
        pass

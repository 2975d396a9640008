"""One action of one decision: what to do, to which VE, and how far it got."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"
FINISHED = frozenset({SUCCEEDED, FAILED})
# Actions that read or rewrite a whole filesystem or image: a host-wide limit bounds how many
# run at once (fsck default 1), the others only wait for their VE's earlier jobs.
HEAVY = frozenset({"fsck", "shrink"})


@dataclass
class Job:
    id: str  # "<rule.matched event id>/<index of the action>": one decision, one job per action
    decision: str
    rule: str
    ve: str | None
    action: str
    params: dict[str, Any]
    dry_run: bool = False
    trigger: dict[str, Any] = field(default_factory=dict)  # the event that fired the rule
    event_ids: list[str] = field(default_factory=list)
    priority: int = 0  # heavy jobs: lower runs first
    state: str = QUEUED
    steps: list[str] = field(default_factory=list)  # completed steps, in order (resumption skips them)
    data: dict[str, Any] = field(default_factory=dict)  # what a step left for the next (a snapshot's guid)
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    attempts: int = 0  # starts, including resumptions after a restart

    @property
    def heavy(self) -> bool:
        return self.action in HEAVY

    @property
    def lane(self) -> str:
        """Jobs of one lane run one after another, in order."""
        return f"ve:{self.ve}" if self.ve else "host"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Job:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

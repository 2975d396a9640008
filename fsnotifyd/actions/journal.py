"""The action journal: every job, durable before it starts and after each step.

An append-only JSON-lines file (``<state-dir>/actions/journal.jsonl``); each line is a job's
whole record, the last line for an id wins. Every append is fsync'd before the step it
records is taken, so after a crash or restart the daemon knows each job's last completed
step: unfinished jobs are resumed from there (their handlers skip completed steps), finished
ones are never run again, and a decision delivered twice is recognised by its job ids. On
open, a journal with many finished jobs is rewritten (temp file, fsync, rename, fsync of the
directory) keeping the unfinished ones and the newest finished ones. A line that does not
parse (a torn last write) is reported with its line number and skipped.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import structlog

from .job import FINISHED, Job

log = structlog.get_logger("fsnotifyd.actions.journal")
KEEP_FINISHED = 1000


class JobJournal:
    def __init__(self, path: str, *, keep_finished: int = KEEP_FINISHED) -> None:
        self.path = path
        self.keep_finished = keep_finished
        self.jobs: dict[str, Job] = {}
        self.problems: list[str] = []
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        lines = self._load()
        if lines > 2 * keep_finished + len(self.unfinished()):
            self._rewrite()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        size = os.fstat(self._fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":  # a torn last line: the next record starts on its own
                    os.write(self._fd, b"\n")

    def _load(self) -> int:
        n = 0
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return 0
        with f:
            for n, raw in enumerate(f, 1):
                try:
                    job = Job.from_dict(json.loads(raw))
                except (ValueError, TypeError) as e:
                    self.problems.append(f"{self.path}:{n}: not a job record ({e}); skipped")
                    log.warning("journal.bad_line", file=self.path, line=n, error=str(e))
                    continue
                self.jobs[job.id] = job
        return n

    def _rewrite(self) -> None:
        finished = sorted((j for j in self.jobs.values() if j.state in FINISHED), key=lambda j: j.finished or 0)
        keep = [j for j in self.jobs.values() if j.state not in FINISHED] + finished[-self.keep_finished:]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for j in keep:
                f.write(json.dumps(j.to_dict(), separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dfd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self.jobs = {j.id: j for j in keep}

    def record(self, job: Job) -> None:
        """Durably note ``job`` as it is now."""
        line = memoryview((json.dumps(job.to_dict(), separators=(",", ":"), default=str) + "\n").encode())
        while line:  # a nearly full disk can take part of a write
            line = line[os.write(self._fd, line):]
        os.fsync(self._fd)
        self.jobs[job.id] = job

    def known(self, job_id: str) -> bool:
        return job_id in self.jobs

    def unfinished(self) -> list[Job]:
        return sorted((j for j in self.jobs.values() if j.state not in FINISHED), key=lambda j: j.created)

    def recent(self, n: int = 50) -> Iterable[Job]:
        return sorted(self.jobs.values(), key=lambda j: j.created)[-n:]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

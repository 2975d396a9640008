"""The action journal: every job, durable before it starts and after each step.

An append-only JSON-lines file (``<state-dir>/actions/journal.jsonl``); each line is a job's
whole record, the last line for an id wins. Every append is fsync'd before the step it
records is taken, so after a crash or restart the daemon knows each job's last completed
step: unfinished jobs are resumed from there (their handlers skip completed steps), finished
ones are never run again, and a decision delivered twice is recognised by its job ids. On
open, a journal with many finished jobs is rewritten (temp file, fsync, rename, fsync of the
directory) keeping the unfinished ones and the newest finished ones. A line that does not
parse (a torn last write) is reported with its line number and skipped.

When the disk refuses an append (full, read-only, failing), jobs go on: the newest record of
each job is kept in memory and appended, in order, at the next record or periodic
:meth:`JobJournal.flush` once the disk takes it (said once each way, ``state.write_failed``
and ``state.write_recovered``, and shown by :class:`~fsnotifyd.statefile.FileHealth`). A crash
in that time loses what was held: those jobs are not resumed. A write the disk took only in
part is cut off again, so no torn line is left for the next record to follow.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterable

import structlog

from ..statefile import FileHealth
from .job import FINISHED, Job

log = structlog.get_logger("fsnotifyd.actions.journal")
KEEP_FINISHED = 1000


class JobJournal:
    def __init__(self, path: str, *, keep_finished: int = KEEP_FINISHED, health: FileHealth | None = None) -> None:
        self.path = path
        self.keep_finished = keep_finished
        self.health = health or FileHealth()
        self.health.watch(path)
        self.jobs: dict[str, Job] = {}
        self.problems: list[str] = []
        # job id -> its newest record the disk has not taken yet (dicts keep insertion order)
        self._pending: dict[str, bytes] = {}
        # Handlers record their steps from worker threads while the event loop records starts
        # and ends: held records must be appended once each, in order.
        self._lock = threading.RLock()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        lines = self._load()
        if lines > 2 * keep_finished + len(self.unfinished()):
            try:
                self._rewrite()
            except OSError as e:  # a full disk: the long journal still reads the same
                log.warning("journal.compact_failed", file=self.path, error=str(e))
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        size = os.fstat(self._fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                torn = f.read(1) != b"\n"
            if torn:  # a torn last line: the next record starts on its own
                try:
                    os.write(self._fd, b"\n")
                except OSError:
                    # No room for one byte: drop the torn line instead (it was already reported).
                    with open(path, "rb") as f:
                        keep = f.read().rfind(b"\n") + 1
                    os.ftruncate(self._fd, keep)

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
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                for j in keep:
                    f.write(json.dumps(j.to_dict(), separators=(",", ":")) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dfd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self.jobs = {j.id: j for j in keep}

    def record(self, job: Job) -> None:
        """Durably note ``job`` as it is now (in memory only, for now, if the disk refuses it)."""
        line = (json.dumps(job.to_dict(), separators=(",", ":"), default=str) + "\n").encode()
        with self._lock:
            self.jobs[job.id] = job
            self._pending.pop(job.id, None)  # an older record not yet written is superseded
            self._pending[job.id] = line
            self.flush()

    @property
    def held(self) -> int:
        """Records kept in memory because the disk refused them."""
        return len(self._pending)

    def flush(self) -> bool:
        """Append the held records, oldest first; False while the disk refuses them."""
        with self._lock:
            if self._fd < 0:
                return not self._pending
            while self._pending:
                job_id, line = next(iter(self._pending.items()))
                try:
                    self._append(line)
                except OSError as e:
                    started = self.health.failed(self.path, e)
                    if started is not None:
                        log.error("state.write_failed", path=self.path, errno=started.errno, error=started.error,
                                  hint="jobs run on; their records are kept in memory and written once the "
                                       "disk takes them (a crash before that loses them)")
                    return False
                del self._pending[job_id]
        ended = self.health.written(self.path)
        if ended is not None:
            log.info("state.write_recovered", path=self.path, refused=ended.refused,
                     failed_for_s=round(time.time() - (ended.since or time.time()), 1))
        return True

    def _append(self, line: bytes) -> None:
        done = 0
        try:
            while done < len(line):  # a nearly full disk can take part of a write
                done += os.write(self._fd, line[done:])
            os.fsync(self._fd)
        except OSError:
            if 0 < done < len(line):  # cut the part off: no torn line for the next record to follow
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, os.fstat(self._fd).st_size - done)
            raise

    def known(self, job_id: str) -> bool:
        return job_id in self.jobs

    def unfinished(self) -> list[Job]:
        return sorted((j for j in self.jobs.values() if j.state not in FINISHED), key=lambda j: j.created)

    def recent(self, n: int = 50) -> Iterable[Job]:
        return sorted(self.jobs.values(), key=lambda j: j.created)[-n:]

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._fd >= 0:
            if not self.flush():
                log.error("state.not_saved", path=self.path, records=len(self._pending),
                          hint="these jobs' last steps are not in the journal: the next start resumes "
                               "them from the last step it has, or does not know them")
            os.close(self._fd)
            self._fd = -1

"""The executor: decisions become jobs, jobs run in order per VE, every step is journaled.

``submit`` takes a ``rule.matched`` event and makes one job per action, ids derived from the
event's id (a decision seen twice makes no new jobs). Jobs of one VE run one after another in
submission order (a lane per VE; jobs of no VE share the host lane); heavy jobs (fsck,
shrink) also take a slot of a host-wide limit, lowest ``priority`` first. A job runs its
handler in a thread with a timeout; dry-run jobs record what they would do. Each start and
end is journaled and emitted as ``action.started`` / ``action.succeeded`` / ``action.failed``.
At start, :meth:`Executor.resume` runs the unfinished jobs of the journal again from their last
completed step.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from ..errors import FsnotifydError
from ..events import Device, Event, Kernel, hostname
from . import repacked
from .job import FAILED, QUEUED, RUNNING, SUCCEEDED, Job
from .journal import JobJournal

log = structlog.get_logger("fsnotifyd.actions")

DEFAULT_TIMEOUT = 600.0
SEVERITY = {"action.started": "info", "action.succeeded": "info", "action.failed": "error", repacked.KIND: "info"}


class ActionError(Exception):
    """An action that cannot be carried out, with the reason a person can act on."""


class Step:
    """What a handler gets besides its job: progress journaling and event emission."""

    def __init__(self, job: Job, record: Callable[[Job], None], emit: Callable[[str, str, dict[str, Any]], None],
                 deadline: float) -> None:
        self.job, self._record, self._emit, self.deadline = job, record, emit, deadline

    def done(self, name: str) -> bool:
        """Was step ``name`` completed by an earlier run of this job (before a restart)?"""
        return name in self.job.steps

    def finish(self, step_name: str, /, **data: Any) -> None:
        """The step is complete; ``data`` is kept for the steps after it (also across a restart)."""
        self.job.steps.append(step_name)
        self.job.data.update(data)
        self._record(self.job)

    def remaining(self) -> float:
        """Seconds left before the job's timeout (for subprocess timeouts)."""
        return max(1.0, self.deadline - time.monotonic())

    def emit(self, kind: str, severity: str, details: dict[str, Any]) -> None:
        self._emit(kind, severity, details)


Handler = Callable[[Job, Step], dict[str, Any]]


class PriorityLimit:
    """An asyncio semaphore whose waiters are served lowest priority value first."""

    def __init__(self, limit: int) -> None:
        self.free = max(1, limit)
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    async def acquire(self, priority: int) -> None:
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._seq), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed over as we were cancelled
            raise

    def release(self) -> None:
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)
                return
        self.free += 1


class Executor:
    def __init__(self, journal: JobJournal, handlers: Mapping[str, Handler],
                 publish: Callable[[Event], None], *, heavy_limit: int = 1,
                 timeouts: Mapping[str, float] | None = None, metrics: Any = None,
                 host: str | None = None, dry_run: bool = False,
                 repair_window: tuple[int, int] | None = None) -> None:
        self.journal = journal
        self.handlers = dict(handlers)
        self.publish = publish
        self.limit = PriorityLimit(heavy_limit)
        self.timeouts = dict(timeouts or {})
        self.metrics = metrics
        self.host = host or hostname()
        self.dry_run = dry_run  # every job only records what it would do
        self.repair_window = repair_window  # (start, end) minutes after local midnight; None: any time
        self._lanes: dict[str, asyncio.Queue[Job]] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}

    # -- taking work ------------------------------------------------------------------------
    def submit(self, decision: Mapping[str, Any]) -> list[Job]:
        """The jobs of a ``rule.matched`` event (none for one already journaled). Call from
        the event loop's thread."""
        details = decision.get("details") or {}
        actions = details.get("actions") or []
        jobs = []
        for i, spec in enumerate(actions):
            if not isinstance(spec, dict) or len(spec) != 1:
                continue
            (name, params), = spec.items()
            job = Job(id=f"{decision.get('id')}/{i}", decision=str(decision.get("id")), rule=str(details.get("rule")),
                      ve=decision.get("ve"), action=name, params=dict(params or {}),
                      dry_run=bool(details.get("dry_run")) or self.dry_run, trigger=_trigger(decision, details),
                      event_ids=list(details.get("event_ids") or []),
                      priority=int((params or {}).get("priority", 0)) if isinstance(params, dict) else 0,
                      created=time.time())
            if self.journal.known(job.id):
                continue
            same = self._waiting_twin(job)
            if same is not None:  # the queued one will do exactly this: say so, do not do it twice
                job.state, job.finished = SUCCEEDED, time.time()
                job.result = {"deduplicated_into": same.id}
                self.journal.record(job)
                self._emit(job, "action.succeeded", {"duration_s": 0.0, "result": job.result, "error": None,
                                                     "steps_done": []})
                continue
            self.journal.record(job)
            jobs.append(job)
            self._enqueue(job)
        return jobs

    def _waiting_twin(self, job: Job) -> Job | None:
        """A heavy job for the same VE with the same parameters that has not started yet."""
        if not job.heavy or not job.ve:
            return None
        for other in self.journal.unfinished():
            if (other.state == QUEUED and other.ve == job.ve and other.action == job.action
                    and other.params.get("mode") == job.params.get("mode") and other.dry_run == job.dry_run):
                return other
        return None

    def resume(self) -> list[Job]:
        """Queue the journal's unfinished jobs again (after a restart), in their old order."""
        jobs = self.journal.unfinished()
        for job in jobs:
            log.info("action.resume", job=job.id, action=job.action, ve=job.ve, steps=job.steps, state=job.state)
            self._enqueue(job)
        return jobs

    def _enqueue(self, job: Job) -> None:
        q = self._lanes.setdefault(job.lane, asyncio.Queue())
        q.put_nowait(job)
        w = self._workers.get(job.lane)
        if w is None or w.done():
            self._workers[job.lane] = asyncio.get_running_loop().create_task(self._lane(job.lane, q))

    async def _lane(self, lane: str, q: asyncio.Queue[Job]) -> None:
        while not q.empty():
            job = q.get_nowait()
            try:
                await self._run(job)
            finally:
                q.task_done()

    async def idle(self) -> None:
        """Return once every queued job has finished (tests, shutdown)."""
        # asyncio.Queue keeps its count of unfinished tasks private (typeshed leaves it out); join()
        # alone cannot tell a lane whose last job is still running from one that is done.
        while any(not q.empty() or q._unfinished_tasks  # type: ignore[attr-defined]
                  for q in self._lanes.values()):
            await asyncio.gather(*(q.join() for q in self._lanes.values()))

    async def close(self) -> None:
        for w in self._workers.values():
            w.cancel()
        await asyncio.gather(*self._workers.values(), return_exceptions=True)

    # -- running ------------------------------------------------------------------------------
    async def _run(self, job: Job) -> None:
        if job.action == "fsck" and job.params.get("mode") == "repair" and not job.dry_run:
            # The VE's later jobs wait too: they were decided after the repair.
            wait = seconds_until_window(self.repair_window, time.localtime())
            if wait > 0:
                log.info("action.waiting_for_window", job=job.id, ve=job.ve, seconds=round(wait))
                await asyncio.sleep(wait)
        if job.heavy:
            await self.limit.acquire(job.priority)
        try:
            await self._run_now(job)
        finally:
            if job.heavy:
                self.limit.release()

    async def _run_now(self, job: Job) -> None:
        loop = asyncio.get_running_loop()
        timeout = float(self.timeouts.get(job.action, DEFAULT_TIMEOUT))
        job.state, job.attempts = RUNNING, job.attempts + 1
        job.started = job.started or time.time()
        self.journal.record(job)
        self._emit(job, "action.started", {"resumed": job.attempts > 1, "steps_done": list(job.steps)})
        t0 = time.monotonic()

        def emit(kind: str, severity: str, details: dict[str, Any]) -> None:  # from the handler's thread
            loop.call_soon_threadsafe(self._emit, job, kind, details, severity)

        step = Step(job, self.journal.record, emit, t0 + timeout)
        try:
            handler = self.handlers.get(job.action)
            if handler is None:
                raise ActionError(f"no handler for action {job.action!r}")
            if job.dry_run:
                job.result = {"dry_run": True, "would": {job.action: job.params}, "ve": job.ve}
            else:
                job.result = await asyncio.wait_for(asyncio.to_thread(handler, job, step), timeout) or {}
            job.state, job.error = SUCCEEDED, None
        except TimeoutError:
            job.state, job.error = FAILED, f"timed out after {timeout:g} s"
        except (ActionError, FsnotifydError, OSError, ValueError, subprocess.SubprocessError) as e:
            job.state, job.error = FAILED, str(e)
        except Exception as e:  # noqa: BLE001 - a handler's bug fails its job, not the daemon
            log.exception("action.crashed", job=job.id, action=job.action)
            job.state, job.error = FAILED, f"{type(e).__name__}: {e}"
        duration = time.monotonic() - t0
        job.finished = time.time()
        self.journal.record(job)
        outcome = "succeeded" if job.state == SUCCEEDED else "failed"
        if self.metrics is not None:
            self.metrics.actions.labels(job.action, outcome).inc()
            self.metrics.action_seconds.labels(job.action).observe(duration)
        self._emit(job, f"action.{outcome}", {"duration_s": round(duration, 6), "result": job.result,
                                              "error": job.error, "steps_done": list(job.steps)})
        pass_details = repacked.details(job) if job.state == SUCCEEDED else None
        if pass_details is not None:
            self._emit(job, repacked.KIND, pass_details)
        log.info(f"action.{outcome}", job=job.id, action=job.action, ve=job.ve, duration_s=round(duration, 3),
                 error=job.error, dry_run=job.dry_run)

    def _emit(self, job: Job, kind: str, extra: dict[str, Any], severity: str | None = None) -> None:
        t = job.trigger
        dev = t.get("device") if isinstance(t.get("device"), dict) else None
        details = {"job": job.id, "action": job.action, "params": job.params, "rule": job.rule,
                   "decision": job.decision, "dry_run": job.dry_run, **extra}
        self.publish(Event(kind=kind, time=time.time(), host=self.host,
                           severity=severity or SEVERITY.get(kind, "info"),
                           device=None if dev is None else Device(dev.get("major"), dev.get("minor"), dev.get("name")),
                           fs=t.get("fs"), mount=t.get("mount"), ve=job.ve, kernel=Kernel(), sources=("actions",),
                           details=details))


def seconds_until_window(window: tuple[int, int] | None, now: time.struct_time) -> float:
    """0 inside the window (or with none), else the seconds until it opens."""
    if window is None:
        return 0.0
    start, end = window
    minute = now.tm_hour * 60 + now.tm_min
    inside = start <= minute < end if start < end else (minute >= start or minute < end)
    if inside:
        return 0.0
    return ((start - minute) % 1440) * 60.0 - now.tm_sec


def _trigger(decision: Mapping[str, Any], details: Mapping[str, Any]) -> dict[str, Any]:
    return {"kind": details.get("trigger_kind"), "device": decision.get("device"), "fs": decision.get("fs"),
            "mount": decision.get("mount"), "event_ids": list(details.get("event_ids") or [])}

"""notify and exec: tell people, or hand the decision to a program.

``notify`` publishes a ``notification`` event: the message and severity the rule gave, the
rule, and the triggering event (kind, device, mount, ids), so every sink (and the webhook and
alerting routes that filter on this kind) gets it. ``exec`` runs the rule's ``command`` (an
argument list, never a shell) with the decision as JSON on stdin, with a timeout; a non-zero
exit fails the job with the tail of its output.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from ..rules.loader import parse_duration
from .executor import ActionError, Step
from .job import Job

OUTPUT_TAIL = 2000


def notify(job: Job, step: Step) -> dict[str, Any]:
    details = {"message": job.params.get("message") or f"rule {job.rule} fired",
               "channel": job.params.get("channel"), "trigger": job.trigger, "event_ids": job.event_ids}
    step.emit("notification", job.params.get("severity", "warning"), details)
    return {"notified": True, "severity": job.params.get("severity", "warning")}


def execute(job: Job, step: Step) -> dict[str, Any]:
    argv = job.params.get("command")
    # Rules are frozen when compiled: a list in the YAML arrives as a tuple from a live daemon.
    argv = list(argv) if isinstance(argv, (list, tuple)) else argv
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise ActionError("exec: 'command' must be a non-empty list of strings (no shell)")
    payload = json.dumps({"job": job.id, "rule": job.rule, "ve": job.ve, "decision": job.decision,
                          "trigger": job.trigger, "event_ids": job.event_ids, "params": job.params})
    raw = job.params.get("timeout")
    timeout = step.remaining() if raw is None else parse_duration(raw)
    if timeout is None or timeout <= 0:
        raise ActionError(f"exec: timeout {raw!r} is not a positive duration")
    try:
        r = subprocess.run(argv, input=payload, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as e:
        raise ActionError(f"exec: {argv[0]}: not found") from e
    except subprocess.TimeoutExpired as e:
        raise ActionError(f"exec: {argv[0]} still running after {timeout:g} s: killed") from e
    result = {"exit_code": r.returncode, "stdout": r.stdout[-OUTPUT_TAIL:], "stderr": r.stderr[-OUTPUT_TAIL:]}
    if r.returncode != 0:
        raise ActionError(f"exec: {argv[0]} exited {r.returncode}: {r.stderr.strip()[-300:]}")
    return result

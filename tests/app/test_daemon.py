"""The daemon's composition: degrading per source, restarting failed sources, publishing."""

from __future__ import annotations

import asyncio
import json

from fsnotifyd.app.daemon import Daemon
from fsnotifyd.config import parse_config
from fsnotifyd.events import Device, Kernel, Observation
from fsnotifyd.testing import FakeSource


def config(tmp_path):
    return parse_config(f"state_dir: {tmp_path / 'state'}\nsocket: {tmp_path / 's.sock'}\n"
                        f"journal: {{path: {tmp_path / 'events.jsonl'}}}\nmetrics: {{port: null}}\n")


def run_daemon(tmp_path, registry, *, seconds: float = 1.5) -> tuple[list[dict], dict]:
    async def main():
        d = Daemon(config(tmp_path), registry={n: (lambda cfg, inv, s=s: s) for n, s in registry.items()})
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(seconds, stop.set)
        status = {}

        async def grab():
            await asyncio.sleep(seconds - 0.2)
            status.update(d.control.status())

        grabber = asyncio.create_task(grab())
        await d.run(stop)
        await grabber
        return status

    status = asyncio.run(main())
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    return events, status


class TestSources:
    def test_unavailable_source_is_down_with_reason_and_the_rest_runs(self, tmp_path):
        """A source that cannot run is reported down with its reason; others keep working."""
        obs = Observation("good", "fs.error", 1.0, Device(7, 9, "loop9"), Kernel(function="f"))
        events, status = run_daemon(tmp_path, {"bad": FakeSource("bad", unavailable="no such interface"),
                                               "good": FakeSource("good", [obs])})
        down = [e for e in events if e["kind"] == "source.down"]
        assert down and down[0]["details"] == {"source": "bad", "reason": "no such interface", "hint": "scripted"}
        assert status["sources"]["bad"] == {**status["sources"]["bad"], "up": False, "reason": "no such interface"}
        assert status["sources"]["good"]["up"] is True
        assert [e["kernel"]["function"] for e in events if e["kind"] == "fs.error"] == ["f"]

    def test_failed_source_is_restarted(self, tmp_path):
        """A source that raises is reported down, then restarted with backoff and comes up."""
        src = FakeSource("flaky", fail_times=1)
        events, status = run_daemon(tmp_path, {"flaky": src}, seconds=2.0)
        kinds = [e["kind"] for e in events if e["details"].get("source") == "flaky"]
        assert kinds == ["source.down", "source.up"]
        assert src.runs == 2 and status["sources"]["flaky"]["restarts"] == 1

    def test_queued_observations_are_published_at_shutdown(self, tmp_path):
        """Stopping publishes what sources already handed over, and closes open groups."""
        obs = [Observation("s", "blk.io_error", 1.0 + i, Device(7, 9, "loop9"), Kernel(block=i)) for i in range(5)]
        events, _ = run_daemon(tmp_path, {"s": FakeSource("s", obs)}, seconds=0.05)  # < io window
        io = [e for e in events if e["kind"] == "blk.io_error"]
        assert sum(e["count"] for e in io) == 5

"""The fakes of :mod:`fsnotifyd.testing` are what they stand in for: each is an instance of its
Protocol in :mod:`fsnotifyd.typing` (``isinstance`` on a runtime-checkable Protocol sees the
names), and each method has the Protocol's parameters and the same sync/async kind, which
``isinstance`` does not look at."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest

from fsnotifyd.events import Device, Event, Kernel, Observation
from fsnotifyd.testing import CapturingSink, FakeClock, FakeSource, MemoryStateStore
from fsnotifyd.typing import Sink, Source, StateStore

FAKES: list[tuple[Any, type]] = [
    (CapturingSink(), Sink),
    (FakeSource("fake"), Source),
    (MemoryStateStore(), StateStore),
]


def _members(protocol: type) -> list[str]:
    return [n for n, v in vars(protocol).items() if inspect.isfunction(v) and not n.startswith("_")]


@pytest.mark.parametrize(("fake", "protocol"), FAKES, ids=lambda x: type(x).__name__ if not isinstance(x, type)
                         else x.__name__)
def test_each_fake_is_its_protocol(fake: Any, protocol: type) -> None:
    assert isinstance(fake, protocol)
    assert _members(protocol), "the Protocol has methods to compare"
    for name in _members(protocol):
        want, got = getattr(protocol, name), getattr(fake, name)
        assert inspect.iscoroutinefunction(got) == inspect.iscoroutinefunction(want), name
        want_params = [(p.name, p.kind) for p in list(inspect.signature(want).parameters.values())[1:]]
        got_params = [(p.name, p.kind) for p in inspect.signature(got).parameters.values()][:len(want_params)]
        assert got_params == want_params, name


def test_an_object_missing_a_member_is_not_a_sink() -> None:
    """The check above can fail: a sink without ``close`` is not a Sink."""

    class NoClose:
        name = "x"

        def publish(self, event: Event) -> None:
            pass

    assert not isinstance(NoClose(), Sink)


def test_the_fakes_behave_as_their_docstrings_say() -> None:
    clock = FakeClock(5.0)
    clock.advance(2.5)
    assert clock() == 7.5

    store = MemoryStateStore()
    store.set("k", 3)
    assert store.flush() is True
    assert store.get("k") == 3 and store.get("missing") is None

    sink = CapturingSink()
    event = Event.__new__(Event)
    sink.publish(event)
    assert sink.events == [event]

    obs = Observation("fake", "fs.error", 1.0, Device(7, 9, "loop9"), Kernel(function="f"))
    src = FakeSource("fake", [obs], fail_times=1)
    sent: list[Observation] = []
    ready: list[bool] = []

    async def main() -> None:
        with pytest.raises(RuntimeError, match="scripted failure 1"):
            await src.run(sent.append, lambda: ready.append(True))
        task = asyncio.create_task(src.run(sent.append, lambda: ready.append(True)))
        for _ in range(100):
            if sent:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert ready == [True] and sent == [obs] and src.runs == 2

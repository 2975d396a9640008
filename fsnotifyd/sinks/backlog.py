"""What a webhook has yet to deliver: its disk spool, and memory while the disk refuses the spool.

Why memory: a host whose disk fills up (or turns read-only, or fails) is exactly one whose
filesystems fail, and its events must still reach the endpoint. So when an append to the
:class:`~fsnotifyd.sinks.spool.Spool` fails (any OSError: ENOSPC, EDQUOT, EROFS, EIO ...) the
event is kept in a bounded in-memory FIFO instead of being lost, and the sender delivers from
there.

Order. The queue the sender sees is ``spool ++ memory``: :meth:`Backlog.peek` hands out the
spool's head while the spool holds anything, then memory's. For that to be the order in which
the events were published, once one event went to memory EVERY later one does too, until memory
is empty again: delivered to the endpoint, or spilled back to the spool by :meth:`Backlog.spill`
(head first, in batches; a write that fails midway keeps the rest in memory, in order). Only
then do appends go to the disk again. So everything on disk was published before everything in
memory, and everything in memory before what is appended to the disk after it.

The bound. Memory holds at most ``memory_max_bytes`` of lines; past it the OLDEST held events
are dropped and counted lost (``memory_full``), like the spool's own drop-oldest bound.

What memory costs. An event acknowledged from memory is gone, as from the spool. An event that
is only in memory when the backlog is closed (after one last spill attempt) is lost: counted
(``not_saved``) and reported by :meth:`Backlog.close`, so the caller can say it once. A crash
loses memory uncounted; that is the price of a disk that takes nothing.

A spool that cannot even be opened (a state directory read-only at start) leaves ``spool``
None: everything goes to memory and :meth:`spill` tries to open it again. Events an earlier
run left in it are then delivered after those held meanwhile: the one case where order is not
kept, because reading them needs the spool open.

Identity across a spill. The sender may be POSTing memory's head while a spill moves it to the
spool; it is then the spool's head (the spool held nothing undelivered, or the sender would
not have taken from memory), so :meth:`ack` and :meth:`is_head` recognise it there by its bytes
(which carry the CloudEvents id).

Thread-safety: one lock around every public method but the sizes (a scrape reads them, one
attribute each); the spool's own lock is only ever taken inside it. Callbacks run under it and
must not call back into the backlog.
"""

from __future__ import annotations

import builtins  # `bytes` in the class bodies below is their size attribute; builtins.bytes is the type
import json
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .spool import LostCallback, Record, Spool, SpoolClosed

SPILL_BATCH_BYTES = 256 << 10  # per lock hold: the event loop's appends wait at most this long


@dataclass(eq=False, slots=True)
class Held:
    """One event in memory, handed out by :meth:`Backlog.peek` like a spool :class:`Record`."""

    data: bytes
    value: Any = None  # the parsed line, filled at the first peek
    spilled: bool = False  # moved to the spool since it was handed out


Item = Record | Held


@dataclass(slots=True)
class MemoryQueue:
    """A FIFO of lines bounded by bytes, dropping the oldest. Unlocked: the Backlog's lock guards it."""

    max_bytes: int
    on_lost: LostCallback
    _items: deque[Held] = field(default_factory=deque)
    bytes: int = 0

    @property
    def events(self) -> int:
        return len(self._items)

    def head(self) -> Held | None:
        return self._items[0] if self._items else None

    def append(self, data: builtins.bytes) -> bool:
        if len(data) > self.max_bytes:
            self.on_lost("memory_full", 1)
            return False
        dropped = 0
        while self.bytes + len(data) > self.max_bytes:
            self.pop()
            dropped += 1
        self._items.append(Held(data))
        self.bytes += len(data)
        if dropped:
            self.on_lost("memory_full", dropped)
        return True

    def pop(self) -> Held:
        held = self._items.popleft()
        self.bytes -= len(held.data)
        return held

    def clear(self) -> int:
        n = len(self._items)
        self._items.clear()
        self.bytes = 0
        return n


class Backlog:
    """The disk spool with a memory queue behind it; see the module docstring.

    ``on_refused(error)`` is called for every write (or opening) the disk refused,
    ``on_landed()`` after every line the disk took while memory is empty: the disk is the
    queue's tail again. The counters (``held``, ``spilled``, ``sent_from_memory``) only grow,
    so that the owner can say how much one failing streak moved.
    """

    def __init__(self, directory: str, max_bytes: int, memory_max_bytes: int, *,
                 on_lost: LostCallback, on_refused: Callable[[OSError], None] = lambda e: None,
                 on_landed: Callable[[], None] = lambda: None) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._on_lost = on_lost
        self._on_refused = on_refused
        self._on_landed = on_landed
        self._lock = threading.Lock()
        self._memory = MemoryQueue(memory_max_bytes, on_lost)
        self._spool: Spool | None = None
        self._closed = False
        self.held = 0  # events that went to memory
        self.spilled = 0  # of those, moved to the spool
        self.sent_from_memory = 0  # of those, acknowledged straight from memory
        with self._lock:
            self._open()

    # -- sizes -------------------------------------------------------------------------------
    @property
    def spool_open(self) -> bool:
        return self._spool is not None

    @property
    def spool_events(self) -> int:
        spool = self._spool
        return spool.events if spool is not None else 0

    @property
    def spool_bytes(self) -> int:
        spool = self._spool
        return spool.bytes if spool is not None else 0

    @property
    def memory_events(self) -> int:
        return self._memory.events

    @property
    def memory_bytes(self) -> int:
        return self._memory.bytes

    @property
    def events(self) -> int:
        return self.spool_events + self.memory_events

    @property
    def closed(self) -> bool:
        return self._closed

    # -- the queue ---------------------------------------------------------------------------
    def append(self, data: bytes) -> None:
        """To the spool, or to memory when memory already holds events (order) or the disk
        refuses the write. Raises :class:`SpoolClosed` once closed."""
        with self._lock:
            if self._closed:
                raise SpoolClosed(f"backlog {self.directory} is closed")
            if self._memory.events == 0 and self._spool is not None:
                try:
                    self._spool.append(data)
                except OSError as e:
                    self._on_refused(e)
                else:
                    self._on_landed()
                    return
            self.held += 1
            self._memory.append(data)

    def peek(self) -> Item | None:
        """The oldest undelivered event: the spool's head, else memory's."""
        with self._lock:
            if self._closed:
                return None
            if self._spool is not None:
                record = self._spool.peek()
                if record is not None:
                    return record
            held = self._memory.head()
            if held is not None and held.value is None:
                try:
                    held.value = json.loads(held.data)
                except ValueError:
                    held.value = {}  # our own encoding: cannot happen; never block the queue on it
            return held

    def is_head(self, item: Item) -> bool:
        """Whether ``item`` is still the next to deliver (a bound may have dropped it)."""
        with self._lock:
            if self._closed:
                return False
            return self._memory.head() is item or self._spool_record(item) is not None

    def ack(self, item: Item) -> bool:
        """Mark ``item`` delivered. False, and nothing done, if it is no longer the head."""
        with self._lock:
            if self._closed:
                return False
            if self._memory.head() is item:
                self._memory.pop()
                self.sent_from_memory += 1
                return True
            record = self._spool_record(item)
            return record is not None and self._spool is not None and self._spool.ack(record)

    def spill(self) -> bool:
        """Move memory to the spool, oldest first, opening the spool if it is not open. True
        when memory is empty afterwards. Releases the lock between batches, so appends (to
        memory's tail: order holds) are not held up by a long spill."""
        while True:
            with self._lock:
                if self._closed:
                    return self._memory.events == 0
                if self._spool is None:
                    if not self._open():
                        return False
                    if self._memory.events == 0:
                        self._on_landed()  # nothing held to write: opening for writes was what failed
                if not self._spill_batch():
                    return False
                if self._memory.events == 0:
                    return True

    def close(self) -> int:
        """Spill what memory holds if the disk takes it, close the spool, and count what is
        left in memory lost (``not_saved``). Returns that count."""
        self.spill()
        with self._lock:
            if self._closed:
                return 0
            self._closed = True
            unsaved = self._memory.clear()
            if unsaved:
                self._on_lost("not_saved", unsaved)
            if self._spool is not None:
                self._spool.close()
            return unsaved

    # -- under the lock ----------------------------------------------------------------------
    def _open(self) -> bool:
        try:
            self._spool = Spool(self.directory, self.max_bytes, on_lost=self._on_lost)
        except OSError as e:
            self._on_refused(e)
            return False
        return True

    def _spill_batch(self) -> bool:
        """One batch of memory to the spool; False when the disk refused a line (it and the
        rest stay in memory)."""
        spool = self._spool
        assert spool is not None
        moved = 0
        while (held := self._memory.head()) is not None and moved < SPILL_BATCH_BYTES:
            try:
                spool.append(held.data)
            except OSError as e:
                self._on_refused(e)
                return False
            self._memory.pop()
            held.spilled = True
            self.spilled += 1
            moved += len(held.data)
        if self._memory.events == 0 and moved:
            self._on_landed()
        return True

    def _spool_record(self, item: Item) -> Record | None:
        """The spool record that is ``item``, if it is the spool's head."""
        if self._spool is None:
            return None
        if isinstance(item, Record):
            return item if self._spool.is_head(item) else None
        if not item.spilled:
            return None
        record = self._spool.peek()
        return record if record is not None and record.data == item.data else None

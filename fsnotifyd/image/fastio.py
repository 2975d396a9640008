"""The exporter's C data path (``_fastio.c``): loading it, feeding it the top delta's mapping,
and putting it in front of mfusepy's read and write callbacks.

The C side answers a read or write whose clusters the top delta all maps, without the GIL;
everything else falls through to the Python callbacks, unchanged. Python stays the owner of
the image: it tells C which clusters the top maps (:meth:`FastIO.serve` after the stack
changes, :meth:`FastIO.mapped` from :class:`.Delta` whenever one mapping changes), and every
Python access to the stack holds :attr:`FastIO.lock`, the C side's mutex, so C never runs
beside a change.

Without the built module (``setup.py build_ext``) :func:`load` returns None and the exporter
runs all in Python, as before; ``FSNOTIFYD_FASTIO=0`` or ``FSNOTIFYD_NO_C=1`` asks for that
too (see :mod:`fsnotifyd.native`).
"""

from __future__ import annotations

import array
import ctypes
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .delta import Delta

import structlog

from .. import native
from .format import ZERO_CLUSTER

log = structlog.get_logger("fsnotifyd.image.fastio")

ABI = 1  # _fastio.c's FSNOTIFYD_ABI: the functions' signatures and struct fio_stats below


class Stats(ctypes.Structure):
    """``struct fio_stats`` in _fastio.c."""

    _fields_ = [("reads", ctypes.c_uint64), ("writes", ctypes.c_uint64), ("read_bytes", ctypes.c_uint64),
                ("written_bytes", ctypes.c_uint64), ("fallbacks", ctypes.c_uint64),
                ("busy_since_ns", ctypes.c_uint64), ("write_waits", ctypes.c_uint64),
                ("ahead_hits", ctypes.c_uint64)]


class Lock:
    """The C mutex as a context manager (what ``threading.Lock`` was to the exporter). ctypes
    drops the GIL while it waits, so a thread waiting here does not stop the others."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lock, self._unlock = lib.fio_lock, lib.fio_unlock

    def acquire(self) -> bool:
        if self._lock() != 0:
            raise RuntimeError("fio_lock failed")
        return True

    def release(self) -> None:
        self._unlock()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self._unlock()


class FastIO:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        lib.fio_configure.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64]
        lib.fio_set.argtypes = [ctypes.c_uint64, ctypes.c_uint32]
        lib.fio_get.argtypes = [ctypes.c_uint64]
        lib.fio_get.restype = ctypes.c_uint32
        lib.fio_load.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
        lib.fio_set_readonly.argtypes = [ctypes.c_int]
        lib.fio_set_fallbacks.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.fio_stats.restype = ctypes.POINTER(Stats)
        lib.fio_take_error.restype = ctypes.c_int
        self.lock = Lock(lib)
        self.stats: Stats = lib.fio_stats().contents
        self._delta: Delta | None = None
        self._keep: list[Any] = []  # the Python callbacks C falls back to: alive while C may call them

    # -- what C serves (the caller holds the lock) --------------------------------------------
    def serve(self, delta: Delta | None, size: int, readonly: bool) -> bool:
        """Serve reads and writes mapped in ``delta`` (the top, writable or not) of a disk of
        ``size`` bytes; None: nothing (every request to Python). True when C serves it."""
        self.off()
        if delta is None or delta.fd < 0:
            return False
        rc = self._lib.fio_configure(delta.fd, delta.direct_fd, delta.cluster, len(delta.bat), size)
        if rc != 0:
            log.warning("fastio.not_serving", error=os.strerror(-rc), delta=delta.path)
            return False
        mapping = array.array("I", delta.bat)
        for vc, p in delta.pending_mappings():
            mapping[vc] = p
        # C serves data clusters only: a cluster marked zero goes to Python like an unmapped one.
        if ZERO_CLUSTER in mapping:
            for vc, p in enumerate(mapping):
                if p == ZERO_CLUSTER:
                    mapping[vc] = 0
        addr, n = mapping.buffer_info()
        self._lib.fio_load(addr, n)
        self._lib.fio_set_readonly(int(readonly or not delta.writable))
        delta.on_map = self.mapped
        delta.on_sync = self.raise_error
        self._delta = delta
        return True

    def off(self) -> None:
        """Serve nothing. A write-behind error stays for :meth:`raise_error` (or the next
        delta served)."""
        self._lib.fio_off()  # waits for the writes in flight
        if self._delta is not None:
            self._delta.on_map = None
            self._delta.on_sync = None
            self._delta = None

    def mapped(self, vc: int, phys: int) -> None:
        """Virtual cluster ``vc`` of the served delta is at ``phys`` now (0: not there)."""
        self._lib.fio_set(vc, phys)

    def raise_error(self) -> None:
        """Raise the first C write-behind write that failed (as Python's write-behind does
        at its next drain: the flush that was to make it durable fails)."""
        e = self._lib.fio_take_error()
        if e:
            raise OSError(e, f"write-behind: {os.strerror(e)}")

    def get(self, vc: int) -> int:
        return self._lib.fio_get(vc)

    def set_readonly(self, readonly: bool) -> None:
        self._lib.fio_set_readonly(int(readonly))

    # -- in front of mfusepy -------------------------------------------------------------------
    def install(self, ops: Any, prototypes: dict[str, Any]) -> None:
        """Put C's read and write in mfusepy's ``fuse_operations``, the Python ones behind."""
        py_read, py_write = ops.read, ops.write
        self._keep += [py_read, py_write]
        self._lib.fio_set_fallbacks(ctypes.cast(py_read, ctypes.c_void_p), ctypes.cast(py_write, ctypes.c_void_p))
        ops.read = ctypes.cast(ctypes.cast(self._lib.fio_read, ctypes.c_void_p), prototypes["read"])
        ops.write = ctypes.cast(ctypes.cast(self._lib.fio_write, ctypes.c_void_p), prototypes["write"])


def load() -> FastIO | None:
    """The C data path, or None (not built, another ABI, or switched off: see fsnotifyd.native)."""
    module = native.load("fsnotifyd.image._fastio", ABI).module
    return None if module is None or module.__file__ is None else FastIO(ctypes.CDLL(module.__file__))

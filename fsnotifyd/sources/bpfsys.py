"""BPF maps read and written through the ``bpf()`` system call, without bcc in the process.

The daemon holds map file descriptors that a short-lived compiler process handed over
(:mod:`.bpfload`); everything it does with them afterwards is a handful of map commands, made
here with ctypes. :class:`Map` keeps the part of bcc's table interface the sources use
(``m[key]``, ``m[key] = v``, ``del m[key]``, ``items()``, ``keys()``, ``clear()``, ``sum(key)``)
with bcc's semantics: per-CPU maps give one value per possible CPU, deleting from an array
zeroes the slot, a missing key is a ``KeyError``.

Linux-only; the system call number is the architecture's.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import platform
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

_NR_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351, "riscv64": 280}

# enum bpf_cmd
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_GET_INFO_BY_FD = 15

# enum bpf_map_type (the ones bpf/*.c uses, and their plain relatives)
HASH, ARRAY, PERF_EVENT_ARRAY, PERCPU_HASH, PERCPU_ARRAY = 1, 2, 4, 5, 6
LRU_HASH, LRU_PERCPU_HASH, ARRAY_OF_MAPS, HASH_OF_MAPS, RINGBUF = 9, 10, 12, 13, 27
_PERCPU = {PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH}
_ARRAYS = {ARRAY, PERCPU_ARRAY, ARRAY_OF_MAPS, PERF_EVENT_ARRAY}


class _ElemAttr(ct.Structure):
    _fields_ = [("map_fd", ct.c_uint32), ("_pad", ct.c_uint32), ("key", ct.c_uint64),
                ("value", ct.c_uint64), ("flags", ct.c_uint64)]


class _InfoAttr(ct.Structure):
    _fields_ = [("bpf_fd", ct.c_uint32), ("info_len", ct.c_uint32), ("info", ct.c_uint64)]


class MapInfo(ct.Structure):
    """The head of ``struct bpf_map_info`` (the kernel fills as much as we give room for)."""
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32), ("map_flags", ct.c_uint32),
                ("name", ct.c_char * 16)]


@lru_cache(maxsize=1)
def _syscall() -> tuple[Any, int]:
    machine = platform.machine()
    if machine not in _NR_BPF:
        raise OSError(errno.ENOSYS, f"no bpf() system call number known for {machine}")
    libc = ct.CDLL(None, use_errno=True)
    libc.syscall.restype = ct.c_long
    return libc.syscall, _NR_BPF[machine]


def bpf(cmd: int, attr: ct.Structure) -> int:
    call, nr = _syscall()
    r = call(ct.c_long(nr), ct.c_int(cmd), ct.byref(attr), ct.c_uint(ct.sizeof(attr)))
    if r < 0:
        e = ct.get_errno()
        raise OSError(e, os.strerror(e))
    return int(r)


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(fd, ct.sizeof(info), ct.addressof(info)))
    return info


@lru_cache(maxsize=1)
def possible_cpus() -> int:
    """How many per-CPU slots a per-CPU map value has: the kernel sizes them by possible CPUs."""
    text = open("/sys/devices/system/cpu/possible").read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += (int(hi) if hi else int(lo)) - int(lo) + 1
    return n


class Map:
    """One BPF map by fd. ``Key`` and ``Leaf`` are ctypes types (``Leaf`` per CPU for per-CPU maps)."""

    def __init__(self, name: str, fd: int, key_type: Any, leaf_type: Any, event_type: Any = None) -> None:
        info = map_info(fd)
        self.name = name
        self.map_fd = fd
        self.map_type = int(info.type)
        self.max_entries = int(info.max_entries)
        self.Key = key_type
        self.sLeaf = leaf_type
        self.event_type = event_type
        self.percpu = self.map_type in _PERCPU
        if self.map_type == RINGBUF:
            self.Leaf = leaf_type
            return
        if key_type is not None and ct.sizeof(key_type) != info.key_size:
            raise ValueError(f"map {name}: key type is {ct.sizeof(key_type)} bytes, the kernel's {info.key_size}")
        if self.percpu:
            # The kernel gives each CPU a slot rounded up to 8 bytes; bcc reads 4-byte integers
            # as 8-byte ones for the same reason.
            if ct.sizeof(leaf_type) % 8 == 0:
                self.Leaf = leaf_type * possible_cpus()
            elif leaf_type in (ct.c_uint, ct.c_int):
                self.Leaf = (ct.c_uint64 if leaf_type is ct.c_uint else ct.c_int64) * possible_cpus()
            else:
                raise ValueError(f"map {name}: a per-CPU value must be 8-byte aligned")
        else:
            self.Leaf = leaf_type
            if ct.sizeof(leaf_type) != info.value_size:
                raise ValueError(f"map {name}: value type is {ct.sizeof(leaf_type)} bytes, "
                                 f"the kernel's {info.value_size}")

    # -- elements ------------------------------------------------------------------------------
    def _key(self, key: Any) -> Any:
        if isinstance(key, int):
            key = self.Key(key)
        if self.map_type in _ARRAYS and not 0 <= int(getattr(key, "value", 0)) < self.max_entries:
            raise IndexError(f"map {self.name}: index {key.value} out of range")
        return key

    def _elem(self, cmd: int, key: Any, value: Any = None, flags: int = 0) -> None:
        attr = _ElemAttr(self.map_fd, 0, ct.addressof(key) if key is not None else 0,
                         ct.addressof(value) if value is not None else 0, flags)
        bpf(cmd, attr)

    def __getitem__(self, key: Any) -> Any:
        key = self._key(key)
        leaf = self.Leaf()
        try:
            self._elem(BPF_MAP_LOOKUP_ELEM, key, leaf)
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise KeyError(key) from None
            raise
        return leaf

    def __setitem__(self, key: Any, leaf: Any) -> None:
        key = self._key(key)
        if not isinstance(leaf, self.Leaf) and ct.sizeof(leaf) != ct.sizeof(self.Leaf):
            raise TypeError(f"map {self.name}: a value of {ct.sizeof(leaf)} bytes, not {ct.sizeof(self.Leaf)}")
        self._elem(BPF_MAP_UPDATE_ELEM, key, leaf)

    def __delitem__(self, key: Any) -> None:
        key = self._key(key)
        if self.map_type in _ARRAYS:
            self._elem(BPF_MAP_UPDATE_ELEM, key, self.Leaf())  # an array slot cannot go: zero it
            return
        try:
            self._elem(BPF_MAP_DELETE_ELEM, key)
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise KeyError(key) from None
            raise

    def __iter__(self) -> Iterator[Any]:
        key = None
        while True:
            nxt = self.Key()
            try:
                self._elem(BPF_MAP_GET_NEXT_KEY, key, nxt)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    return
                raise
            yield nxt
            key = nxt

    def __len__(self) -> int:
        if self.map_type in _ARRAYS:
            return self.max_entries
        return sum(1 for _ in self)

    def keys(self) -> list[Any]:
        return list(self)

    def items(self) -> list[tuple[Any, Any]]:
        out = []
        for k in self:
            try:
                out.append((k, self[k]))
            except KeyError:  # deleted by a program between the key and the lookup
                pass
        return out

    def clear(self) -> None:
        for k in self.keys():
            try:
                del self[k]
            except KeyError:
                pass

    def sum(self, key: Any) -> Any:
        """A per-CPU integer value summed over CPUs, as the map's value type (bcc's ``sum``)."""
        if not self.percpu or issubclass(self.sLeaf, (ct.Structure, ct.Union)):
            raise TypeError(f"map {self.name}: sum() needs a per-CPU integer map")
        return self.sLeaf(sum(int(v) for v in self[key]))

    # -- records -------------------------------------------------------------------------------
    def event(self, data: Any, offset: int = 0) -> Any:
        """A ring-buffer record as the ctypes type bcc inferred from the program (copied out)."""
        if self.event_type is None:
            raise TypeError(f"map {self.name}: no record type known")
        return self.event_type.from_buffer_copy(data, offset)

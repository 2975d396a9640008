"""The ctypes layout description that carries map types from the compiler child to the daemon."""

from __future__ import annotations

import ctypes as ct
import json

import pytest

from fsnotifyd.sources import bpflayout


class Inner(ct.Structure):
    _fields_ = [("cgroup_id", ct.c_ulonglong), ("pid", ct.c_uint), ("err", ct.c_int)]


class Anon(ct.Union):
    _fields_ = [("u", ct.c_uint64), ("b", ct.c_ubyte * 8)]


class Outer(ct.Structure):
    _anonymous_ = ("x",)
    _fields_ = [("key", Inner), ("comm", ct.c_char * 16), ("flags", ct.c_uint, 3), ("rest", ct.c_uint, 29),
                ("x", Anon), ("arr", Inner * 2)]


class Packed(ct.Structure):
    _pack_ = 1
    _fields_ = [("a", ct.c_ubyte), ("b", ct.c_uint64)]


class TestRoundTrip:
    @pytest.mark.parametrize("t", [ct.c_uint64, ct.c_int, ct.c_char * 16, Inner, Anon, Outer, Packed])
    def test_same_size_and_bytes(self, t):
        """A type rebuilt from its JSON description has the same size and reads the same bytes."""
        desc = json.loads(json.dumps(bpflayout.describe(t)))
        rebuilt = bpflayout.build(desc)
        assert ct.sizeof(rebuilt) == ct.sizeof(t)
        raw = bytes(range(ct.sizeof(t)))
        assert bytes(rebuilt.from_buffer_copy(raw)) == bytes(t.from_buffer_copy(raw))

    def test_fields_read_alike(self):
        """Nested, array, bitfield and anonymous-union fields decode to the same values."""
        o = Outer()
        o.key.cgroup_id, o.key.pid, o.key.err = 1 << 40, 7, -28
        o.comm, o.flags, o.rest, o.u = b"dd", 5, 12345, 0x0102030405060708
        o.arr[1].pid = 99
        r = bpflayout.build(bpflayout.describe(Outer)).from_buffer_copy(bytes(o))
        assert (r.key.cgroup_id, r.key.pid, r.key.err) == (1 << 40, 7, -28)
        assert (r.comm, r.flags, r.rest, r.u, r.arr[1].pid) == (b"dd", 5, 12345, 0x0102030405060708, 99)

    def test_packed_keeps_its_packing(self):
        assert ct.sizeof(bpflayout.build(bpflayout.describe(Packed))) == 9


class TestBadDescriptions:
    @pytest.mark.parametrize("desc", ["Z", {"kind": "enum"}, 5, {"array": "%", "length": 2}])
    def test_refused_with_a_layout_error(self, desc):
        with pytest.raises(bpflayout.LayoutError):
            bpflayout.build(desc)

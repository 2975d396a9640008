"""A ctypes type as plain data, and back: how a map's key, value and record types cross processes.

bcc derives the ctypes type of every map key, value and ring-buffer record from the C it
compiles (so the layout is written once, in ``bpf/``). The compiler runs in a child process
(:mod:`.bpfchild`); the daemon, which never imports bcc, rebuilds the same types from this
description. Pure: no I/O, imported by both sides.

A description is a JSON value:
- a simple type: its ctypes type code (``"Q"``, ``"I"``, ``"c"`` ...);
- an array: ``{"array": ELEMENT, "length": N}``;
- a struct or union: ``{"name": ..., "kind": "struct"|"union", "pack": N|null, "anonymous": [...],
  "fields": [[name, TYPE] | [name, TYPE, bits], ...]}``.
"""

from __future__ import annotations

import ctypes as ct
from typing import Any

# Type codes of the simple ctypes types a BPF layout can use. Aliases (c_ulonglong is c_ulong
# on LP64) share a code, so either side may name them as it likes.
_SIMPLE: dict[str, Any] = {}
for _t in (ct.c_char, ct.c_byte, ct.c_ubyte, ct.c_short, ct.c_ushort, ct.c_int, ct.c_uint, ct.c_long,
           ct.c_ulong, ct.c_longlong, ct.c_ulonglong, ct.c_float, ct.c_double, ct.c_longdouble, ct.c_bool,
           ct.c_void_p, ct.c_char_p):
    _SIMPLE.setdefault(_t._type_, _t)


class LayoutError(ValueError):
    pass


def describe(t: Any) -> Any:
    """The description of ctypes type ``t``."""
    if isinstance(t, type) and issubclass(t, ct.Array):
        return {"array": describe(t._type_), "length": t._length_}
    if isinstance(t, type) and issubclass(t, (ct.Structure, ct.Union)):
        fields = []
        for f in t._fields_:
            fields.append([f[0], describe(f[1])] + ([f[2]] if len(f) > 2 else []))
        return {"name": t.__name__, "kind": "union" if issubclass(t, ct.Union) else "struct",
                "pack": getattr(t, "_pack_", None), "anonymous": list(getattr(t, "_anonymous_", ())),
                "fields": fields}
    code = getattr(t, "_type_", None)
    if isinstance(code, str) and code in _SIMPLE:
        return code
    raise LayoutError(f"no description for ctypes type {t!r}")


def build(desc: Any) -> Any:
    """The ctypes type that ``desc`` describes."""
    if isinstance(desc, str):
        try:
            return _SIMPLE[desc]
        except KeyError:
            raise LayoutError(f"unknown simple type code {desc!r}") from None
    if isinstance(desc, dict) and "array" in desc:
        return build(desc["array"]) * int(desc["length"])
    if isinstance(desc, dict) and desc.get("kind") in ("struct", "union"):
        fields = [(f[0], build(f[1])) + ((int(f[2]),) if len(f) > 2 else ()) for f in desc["fields"]]
        ns: dict[str, Any] = {"_anonymous_": tuple(desc.get("anonymous") or ()), "_fields_": fields}
        if desc.get("pack"):
            ns["_pack_"] = int(desc["pack"])
        base = ct.Union if desc["kind"] == "union" else ct.Structure
        return type(str(desc.get("name") or "anon"), (base,), ns)
    raise LayoutError(f"not a type description: {desc!r}")

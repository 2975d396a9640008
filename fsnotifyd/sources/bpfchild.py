"""The compiler process: bcc compiles and attaches one program, hands its descriptors over, exits.

bcc keeps LLVM/clang and every compiled program in the process that compiles (about 240 MB of
RSS for as long as it lives). The daemon runs this module as a child instead
(``python -m fsnotifyd.sources.bpfchild FD``); the child reads ``{"name", "text"}`` as JSON on
stdin, compiles ``text`` with bcc (which attaches its ``TRACEPOINT_PROBE`` and
``RAW_TRACEPOINT_PROBE`` functions as it loads), and sends one message on the unix socket ``FD``:
a JSON description of every map (name, key, value and record layouts, see :mod:`.bpflayout`)
with, as SCM_RIGHTS, the map fds and the attachment fds (perf-event and raw-tracepoint links).
The programs stay attached for as long as the daemon holds those fds.

The child leaves with ``os._exit``: bcc's exit handler would detach the tracepoints, and a
perf-event fd the daemon now shares would be disabled with it. On failure the message is
``{"error": ...}`` with no fds; the compiler's and verifier's own output goes to stderr.

Imports only bcc and the pure layout module: nothing of the daemon is loaded here.
"""

from __future__ import annotations

import ctypes as ct
import json
import os
import socket
import sys
import time
from typing import Any

from .bpflayout import describe

RINGBUF = 27


class BccMissing(ImportError):
    pass


PERCPU = {5, 6, 10}


def _maps(b: Any) -> list[tuple[dict[str, Any], int]]:
    from bcc import lib
    from bcc.table import _get_event_class

    lib.bpf_num_tables.restype = ct.c_size_t
    lib.bpf_num_tables.argtypes = [ct.c_void_p]
    lib.bpf_table_name.restype = ct.c_char_p
    lib.bpf_table_name.argtypes = [ct.c_void_p, ct.c_size_t]
    out = []
    for i in range(lib.bpf_num_tables(b.module)):
        name = lib.bpf_table_name(b.module, i)
        t = b.get_table(name)
        if t.map_fd < 0:
            continue
        ttype = lib.bpf_table_type_id(b.module, t.map_id)
        entry: dict[str, Any] = {"name": name.decode(), "type": ttype}
        if ttype == RINGBUF:
            entry["size"] = int(lib.bpf_table_max_entries_id(b.module, t.map_id))
            try:
                entry["event"] = describe(_get_event_class(t))
            except Exception as e:  # noqa: BLE001 - a ring buffer no program writes: no record type
                entry["event_error"] = str(e)
        else:
            entry["key"] = describe(t.Key)
            entry["leaf"] = describe(t.sLeaf if ttype in PERCPU else t.Leaf)
        out.append((entry, t.map_fd))
    return out


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[1]))
    try:
        req = json.load(sys.stdin)
        t0 = time.monotonic()
        try:
            from bcc import BPF
        except ImportError as e:  # found by the daemon's check, yet not importable here
            raise BccMissing(f"bcc is not importable ({e})") from e
        b = BPF(text=req["text"].encode())
        maps = _maps(b)
        links = [(f"tracepoint:{tp.decode()}", fd) for tp, fd in b.tracepoint_fds.items()]
        links += [(f"raw_tracepoint:{tp.decode()}", fd) for tp, fd in b.raw_tracepoint_fds.items()]
        msg = {"maps": [m for m, _ in maps], "links": [name for name, _ in links],
               "compile_seconds": time.monotonic() - t0}
        socket.send_fds(sock, [json.dumps(msg).encode()], [fd for _, fd in maps] + [fd for _, fd in links])
    except BaseException as e:  # noqa: BLE001 - whatever failed, the daemon is told what
        text = str(e).strip()
        reason = text.splitlines()[-1] if text else type(e).__name__
        try:
            sock.send(json.dumps({"error": reason, "type": type(e).__name__}).encode())
        except OSError:
            pass
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)

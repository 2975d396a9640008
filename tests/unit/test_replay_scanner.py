"""The C journal scanner (``replay/_jsonl.c``) against the Python reader (``reader._jsonl``).

On any journal (events in and out of order, bad lines, blank lines, other JSON, stamps in
every form the Python reader accepts or refuses) both must give the same items in the same
order, and the same counts and skipped-line reports.
"""

from __future__ import annotations

import gzip
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fsnotifyd.replay.reader import _native_scanner, read_items
from fsnotifyd.replay.report import ReadReport

SCANNER = _native_scanner()


def test_the_c_scanner_is_built():
    if os.environ.get("FSNOTIFYD_PURE_PYTHON"):
        pytest.skip("FSNOTIFYD_PURE_PYTHON is set: the reference is chosen on purpose")
    assert SCANNER is not None, "fsnotifyd/replay/_jsonl.c is not built: run scripts/bootstrap.sh"


pytestmark = pytest.mark.skipif(SCANNER is None, reason="C scanner not built (scripts/bootstrap.sh builds it)")

# Stamps: the form fsnotifyd writes, and every neighbour of it the Python reader treats otherwise.
STAMPS = [
    "2026-11-25T22:51:09.791234Z", "2026-11-25T22:51:09Z", "2026-11-25T22:51:09.5Z", "2026-11-25T22:51:75.5Z",
    "2026-11-25T22:51:09.Z", "2026-11-25 22:51:09.5Z", "2026-11-25T22:51:09+00:00", "2026-11-25T22:51:09.5+01:00",
    "2026-02-29T00:00:00Z", "2024-02-29T23:59:59.999999Z", "2026-13-01T00:00:00Z", "0000-01-01T00:00:00Z",
    "2026-11-25T24:00:00Z", "2026-11-25T22:51:٠٩Z", "2026-11-25T22:51:09.٥Z", "2026-11-25T22:51:0Z",
    "1970-01-01T00:00:00Z", "9999-12-31T23:59:59.999999999Z", "2026-11-25T22:51:09", "yesterday", "",
]
SCHEMAS = ["fsnotifyd.event/1", "fsnotifyd.event/2", "fsnotifyd.eventé/1", "other/1", None, 1]


@st.composite
def journals(draw):
    lines = []
    base = 1_790_000_000
    for i in range(draw(st.integers(0, 60))):
        what = draw(st.sampled_from(["event"] * 6 + ["odd-stamp", "blank", "garbage", "other-json", "schema",
                                                     "no-time", "array"]))
        if what == "blank":
            lines.append(draw(st.sampled_from(["", "   ", "\t"])))
        elif what == "garbage":
            lines.append(draw(st.sampled_from(["{", "not json", "{\"a\": }", "\x00\x01", "é{"])))
        elif what == "array":
            lines.append("[1, 2]")
        elif what == "other-json":
            lines.append(json.dumps({"hello": i}))
        else:
            ev = {"schema": "fsnotifyd.event/1", "id": f"e{i}", "kind": "fs.error"}
            if what == "schema":
                ev["schema"] = draw(st.sampled_from(SCHEMAS))
            if what == "odd-stamp":
                ev["time"] = draw(st.sampled_from(STAMPS + [None, 5, 1.5]))
            elif what == "event":
                # mostly in order, sometimes back by less or more than the reorder slack (30 s)
                base += draw(st.sampled_from([0, 0, 1, 7, 23, 30, 45, -3, -31, -40]))
                frac = draw(st.sampled_from(["", ".5", ".000001", ".791234"]))
                ev["time"] = _rfc3339(base) + frac + "Z"
            lines.append(json.dumps(ev, ensure_ascii=draw(st.booleans())))
    text = "\n".join(lines) + draw(st.sampled_from(["", "\n", "\n\n"]))
    return text.encode()


def _rfc3339(t: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _read(path, native):
    report = ReadReport(max_examples=10_000)  # every skipped line compared, not the first five
    items = list(read_items([str(path)], report=report, native=native))
    return items, report


@settings(max_examples=300, deadline=None)
@given(journals(), st.booleans())
def test_c_and_python_read_journals_identically(tmp_path_factory, data, gz):
    path = tmp_path_factory.mktemp("j") / ("events.jsonl.gz" if gz else "events.jsonl")
    # The first lines decide the format: start with one real event so every file is a journal.
    data = b'{"schema":"fsnotifyd.event/1","id":"first","time":"2026-01-01T00:00:00Z"}\n' + data
    path.write_bytes(gzip.compress(data) if gz else data)
    got, got_report = _read(path, True)
    want, want_report = _read(path, False)
    assert got == want
    assert [type(t) for t, _, _ in got] == [float] * len(got)
    assert vars(got_report) == vars(want_report)


def test_a_journal_in_blocks_and_without_a_final_newline(tmp_path):
    """Lines that straddle the scanner's 1 MiB reads, and a last line with no newline."""
    lines = [json.dumps({"schema": "fsnotifyd.event/1", "id": f"e{i}", "time": _rfc3339(1_790_000_000 + i) + "Z",
                         "pad": "x" * (i % 997)}) for i in range(6000)]
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(lines))
    got, report = _read(path, True)
    want, _ = _read(path, False)
    assert got == want and len(got) == 6000 and report.events == 6000 and report.lines == 6000
    assert [e["id"] for _, _, e in got] == [f"e{i}" for i in range(6000)]


def test_a_scanner_dropped_early_still_counts_what_it_read(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text("\n".join(json.dumps({"schema": "fsnotifyd.event/1", "id": str(i),
                                          "time": _rfc3339(1_790_000_000 + 100 * i) + "Z"}) for i in range(10)))
    report = ReadReport()
    it = read_items([str(path)], report=report)
    next(it)
    del it
    assert report.lines >= 2 and report.events == report.lines

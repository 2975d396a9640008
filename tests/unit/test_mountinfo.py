"""mountinfo parsing: real lines, odd lines, and fuzz."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fsnotifyd.mountinfo import parse_line, parse_mountinfo

REAL = (
    "42 27 7:0 / /tmp/exp/m rw,relatime - ext4 /dev/loop0 rw\n"
    "43 27 7:1 / /mnt/with\\040space rw,relatime shared:5 master:1 - ext4 /dev/loop1 rw,emergency_ro\n"
    "44 27 0:40 / /run/user tmpfs rw - tmpfs tmpfs rw,size=1k\n"
)


class TestParse:
    def test_real_lines(self):
        """Optional fields, octal escapes and super options are handled."""
        a, b, c = parse_mountinfo(REAL)
        assert (a.devnum, a.mountpoint, a.fstype, a.readonly) == ((7, 0), "/tmp/exp/m", "ext4", False)
        assert b.mountpoint == "/mnt/with space" and b.emergency_ro and b.readonly
        assert c.fstype == "tmpfs" and c.major == 0

    def test_odd_lines_are_skipped(self):
        """Lines without a separator or with bad numbers give None, not exceptions."""
        for line in ("", "garbage", "1 2 x:y / / rw - ext4 /d rw", "1 2 7:0 / / rw ext4 /d rw", "- - -"):
            assert parse_line(line) is None

    @settings(max_examples=400, deadline=None)
    @given(st.text(max_size=300))
    def test_fuzz_text_never_raises(self, text):
        """Random text never raises."""
        parse_mountinfo(text)

    @settings(max_examples=300, deadline=None)
    @given(st.integers(0, len(REAL)), st.integers(0, len(REAL)), st.text(max_size=20))
    def test_fuzz_mutations_never_raise(self, i, j, junk):
        """Truncated and spliced real lines never raise."""
        parse_mountinfo(REAL[:i] + junk + REAL[j:])

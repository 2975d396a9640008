"""fsnotifyd.image.e2fsck: what an e2fsck exit status allows."""

from __future__ import annotations

import pytest

from fsnotifyd.image.e2fsck import Result, decode, outcome


class TestDecode:
    def test_each_bit_is_named(self):
        """12 is two facts: errors left and an operational error."""
        assert decode(12) == ["errors left uncorrected", "operational error"]

    def test_zero_is_no_errors(self):
        """0 names no bit."""
        assert decode(0) == ["no errors"]


class TestRepaired:
    @pytest.mark.parametrize("code", [0, 1, 2, 3])
    def test_fixed_or_clean_may_go_on(self, code):
        """0 to 3 after -p or -y: the filesystem may be resized and mounted."""
        assert Result(("e2fsck", "-fy", "/dev/x"), code, "").repaired

    @pytest.mark.parametrize("code", [4, 5, 8, 9, 12, 16, 32, 128, -9])
    def test_anything_from_4_up_or_a_signal_may_not(self, code):
        """Errors left, an operational error, usage, cancel, a library error or a kill."""
        assert not Result(("e2fsck", "-fy", "/dev/x"), code, "").repaired

    def test_a_killed_run_says_so(self):
        """A negative status is the signal that ended e2fsck, not a bit mask."""
        assert Result(("e2fsck",), -9, "").decoded == ["killed by signal 9"]


class TestOutcome:
    def test_a_check_that_gave_up_after_finding_errors_found_errors(self):
        """-n with 4|8 (a damaged journal) still found errors; a repair with 4 failed."""
        assert outcome(12, repair=False) == "errors"
        assert outcome(4, repair=True) == "failed"


def test_tail_is_how_e2fsck_ended():
    """The last non-empty lines on one line, without the version banner of stderr."""
    out = ("Pass 5\n\n/dev/x: ** WARNING: Filesystem still has errors **\n\n/dev/x: 1/2 files\n"
           "e2fsck 1.47.0 (5-Feb-2023)\n")
    assert Result(("e2fsck",), 4, out).tail() == ("/dev/x: ** WARNING: Filesystem still has errors ** / "
                                                  "/dev/x: 1/2 files")

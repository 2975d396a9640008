"""Syscall names from the UAPI header, without bcc (which would load LLVM into the daemon)."""

from __future__ import annotations

import platform
import sys

import pytest

from fsnotifyd import syscalls

SAMPLE = """#ifndef _ASM_UNISTD_64_H
#define _ASM_UNISTD_64_H

#define __NR_read 0
#define __NR_write 1
#define __NR_fallocate 285
#define __NR_syscalls_end_marker_not_a_number FOO
#endif
"""


class TestParse:
    def test_numbers_to_names(self):
        assert syscalls.parse_unistd(SAMPLE) == {0: "read", 1: "write", 285: "fallocate"}

    def test_garbage_gives_nothing(self):
        assert syscalls.parse_unistd("#define __NR_\n#define X 1\nnot a header") == {}


@pytest.mark.skipif(platform.machine() != "x86_64", reason="numbers checked are x86_64's")
class TestThisMachine:
    def test_names_of_the_calls_that_fail_with_enospc(self):
        assert [syscalls.name(n) for n in (1, 18, 257, 285)] == ["write", "pwrite64", "openat", "fallocate"]

    def test_an_unknown_number_stays_a_number(self):
        assert syscalls.name(99999) == "99999"

    def test_naming_does_not_import_bcc(self):
        from fsnotifyd.sources.bpf_space import syscall_name

        syscall_name(1)
        assert "bcc" not in sys.modules

"""Unit tests of the kmsg source: record parsing, classification, and the reading loop.

Lines marked "captured" were read from /dev/kmsg on the project's kernel 6.18 machine; the
others follow the kernel's format strings for paths that are hard to trigger on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fsnotifyd.errors import SourceFailed, SourceUnavailable
from fsnotifyd.events import KINDS, Observation
from fsnotifyd.kernel.classify import classify
from fsnotifyd.kernel.jbd2 import journal_device
from fsnotifyd.kernel.kmsg import KmsgRecord, parse_record
from fsnotifyd.sources.kmsg import KmsgSource, boot_wallclock

BOOT = 1_700_000_000.0


def obs_of(raw: bytes, **kw) -> Observation | None:
    rec = parse_record(raw)
    assert rec is not None, raw
    return classify(rec, BOOT, **kw)


# Captured on kernel 6.18 (fsnotifyd test runs: trigger_fs_error, simulate_fail, errors=remount-ro,
# EXT4_IOC_SHUTDOWN, a loop device over a full tmpfs, a root inode cleared with debugfs).
CAPTURED = {
    "trigger": b"2,352,6502543038,-;EXT4-fs error (device loop0): trigger_test_error:129: comm python: hello\n",
    "lookup": (b"2,359,6505786973,-;EXT4-fs error (device loop0): ext4_lookup:1787: inode #15: comm cat: iget: "
               b"checksum invalid\n"),
    "fill_super": (b"2,379,6507700777,-;EXT4-fs error (device loop0): __ext4_fill_super:5544: inode #2: comm mount: "
                   b"iget: special inode unallocated\n"),
    "abort": b"3,366,6506488285,-;Aborting journal on device loop0-8.\n",
    "remount_ro": b"2,367,6506489253,-;EXT4-fs (loop0): Remounting filesystem read-only\n",
    "shutdown": b"1,372,6507039440,-;EXT4-fs (loop0): shut down requested (1)\n",
    "root_failed": b"3,380,6507702147,-;EXT4-fs (loop0): get root inode failed\n",
    "mount_failed": b"3,381,6507702746,-;EXT4-fs (loop0): mount failed\n",
    "cant_find": b"3,377,6507387770,-;EXT4-fs (loop0): VFS: Can't find ext4 filesystem\n",
    "nospc": (b"3,388,6524851231,-;critical space allocation error, dev loop0, sector 8192 op 0x1:(WRITE) flags "
              b"0xc800 phys_seg 128 prio class 2\n"),
    "buffer_dev": b"3,391,6525190597,-;Buffer I/O error on dev loop0, logical block 2560, lost async page write\n",
    "buffer_device": b"3,416,6525607383,-;Buffer I/O error on device loop0, logical block 20481\n",
    "end_bio": (b"4,411,6525605492,-;EXT4-fs warning (device loop0): ext4_end_bio:368: I/O error 3 writing to inode "
                b"12 starting block 21761)\n"),
    "mounted": (b"6,351,6502542388,-;EXT4-fs (loop0): mounted filesystem f9b9c801-6419-4669-8578-f0a355b64934 r/w "
                b"with ordered data mode. Quota mode: none.\n"),
    "unmounting": b"6,348,6292131804,-;EXT4-fs (loop0): unmounting filesystem da9e7c21-55e1-425a-9b2b-bcc4536ed96c.\n",
    "capacity": b"6,345,6273545741,-;loop0: detected capacity change from 0 to 131072\n",
    "rcu_tab": b"6,90,241034,-;rcu: \\x09RCU restricting CPUs from NR_CPUS=256 to nr_cpu_ids=2.\n",
    "amd_nl": (b"4,287,412609,-;amd_pstate: The CPPC feature is supported but currently disabled by the "
               b"BIOS.\\x0aPlease enable it if your BIOS has the CPPC option.\n"),
    "user": b"11,349,6502531782,-;fsnd-probe clock test\n",
}

# From the kernel's format strings (fs/ext4/super.c, block/blk-core.c), not captured.
FROM_SOURCE = {
    "lookup_deleted": (b"2,10,5000000,-;EXT4-fs error (device loop4): ext4_lookup:1789: inode #12: comm ls: deleted "
                       b"inode referenced: 18\n"),
    "inode_block": (b"2,11,5000001,-;EXT4-fs error (device loop4): ext4_find_entry:1650: inode #12: block 1234: "
                    b"comm ls: reading directory lblock 0\n"),
    "file_path": (b"2,12,5000002,-;EXT4-fs error (device loop4): ext4_readdir:258: inode #2: block 9: comm ls: path "
                  b"/mnt/d: bad entry in directory: rec_len is zero\n"),
    "std_error": b"2,13,5000003,-;EXT4-fs error (device loop0) in ext4_reserve_inode_write:5712: IO failure\n",
    "bitmap": (b"2,14,5000004,-;EXT4-fs error (device loop0): ext4_validate_block_bitmap:421: comm x: bg 0: bad "
               b"block bitmap checksum\n"),
    "grp": (b"2,15,5000005,-;EXT4-fs error (device loop0): ext4_mb_generate_buddy:1217: group 3, block bitmap and "
            b"bg descriptor inconsistent: 100 vs 99 free clusters\n"),
    "grp_inode_block": (b"2,16,5000006,-;EXT4-fs error (device loop0): ext4_free_blocks:6300: group 1, inode 12: "
                        b"block 3300:freeing already freed block\n"),
    "nodev": b"2,17,5000007,-;EXT4-fs error: ext4_fill_super:4242: comm mount: no device\n",
    "dx_full": (b"4,18,5000008,-;EXT4-fs warning (device loop0): ext4_dx_add_entry:2604: inode #2: comm x: "
                b"Directory index full!\n"),
    "warning": (b"4,19,5000009,-;EXT4-fs warning (device loop0): ext4_multi_mount_protect:305: MMP interval 42 "
                b"higher than expected\n"),
    "io_read": b"3,20,5000010,-;I/O error, dev loop3, sector 16784 op 0x0:(READ) flags 0x0 phys_seg 1 prio class 0\n",
    "timeout": (b"3,21,5000011,-;timeout error, dev sda, sector 2048 op 0x1:(WRITE) flags 0x800 phys_seg 1 prio "
                b"class 0\n"),
    "target": (b"3,22,5000012,-;critical target error, dev sdb, sector 8 op 0x0:(READ) flags 0x80700 phys_seg 1 "
               b"prio class 2\n"),
    "unknown_status": (b"3,23,5000013,-;brand new error, dev vdb, sector 8 op 0x0:(READ) flags 0x0 phys_seg 1 prio "
                       b"class 2\n"),
    "io_props": (b"3,24,5000014,-;I/O error, dev loop3, sector 16784 op 0x0:(READ) flags 0x0 phys_seg 1 prio class "
                 b"0\n SUBSYSTEM=block\n DEVICE=b7:3\n"),
}

ALL_LINES = list(CAPTURED.values()) + list(FROM_SOURCE.values())


class TestParseRecord:
    def test_header_fields(self):
        """PRI splits into level and facility; seq and timestamp are integers."""
        rec = parse_record(CAPTURED["trigger"])
        assert rec == KmsgRecord(
            seq=352, ts_usec=6502543038, level=2, facility=0,
            message="EXT4-fs error (device loop0): trigger_test_error:129: comm python: hello",
            props={},
        )

    def test_user_facility(self):
        """A record written from user space carries facility LOG_USER (1)."""
        rec = parse_record(CAPTURED["user"])
        assert (rec.level, rec.facility) == (3, 1)

    def test_continuation_lines_are_props(self):
        """" KEY=VALUE" lines after the message become props."""
        rec = parse_record(FROM_SOURCE["io_props"])
        assert dict(rec.props) == {"SUBSYSTEM": "block", "DEVICE": "b7:3"}
        assert rec.message.startswith("I/O error, dev loop3")

    def test_escapes_are_unescaped(self):
        """\\xNN escapes in the message become the bytes they stand for."""
        want = "rcu: \tRCU restricting CPUs from NR_CPUS=256 to nr_cpu_ids=2."
        assert parse_record(CAPTURED["rcu_tab"]).message == want
        assert "BIOS.\nPlease" in parse_record(CAPTURED["amd_nl"]).message

    def test_escaped_backslash_is_unescaped_once(self):
        """The kernel escapes '\\' itself, so '\\x5cx41' is the text '\\x41', not 'A'."""
        assert parse_record(b"6,1,2,-;a\\x5cx41b\n").message == "a\\x41b"

    def test_escaped_utf8(self):
        """Escaped UTF-8 bytes decode to text; invalid bytes to U+FFFD."""
        assert parse_record(b"6,1,2,-;caf\\xc3\\xa9 \\xff\n").message == "caf\u00e9 \ufffd"

    def test_escaped_prop_value(self):
        """Property values are unescaped like the message."""
        assert parse_record(b"6,1,2,-;m\n K=a\\x20b\n").props == {"K": "a b"}

    def test_caller_field(self):
        """CONFIG_PRINTK_CALLER's ',caller=T123' header field is kept."""
        assert parse_record(b"6,1,2,-,caller=T123;m\n").caller == "T123"

    def test_continued_flag(self):
        """The 'c' (continued) flag is accepted."""
        assert parse_record(b"4,5,6,c;part\n").message == "part"

    def test_without_trailing_newline(self):
        """A record missing its final newline still parses."""
        assert parse_record(b"6,1,2,-;m").message == "m"

    def test_empty_message(self):
        """An empty message is a record."""
        assert parse_record(b"6,1,2,-;\n").message == ""

    def test_bytearray(self):
        """bytearray input is accepted."""
        assert parse_record(bytearray(CAPTURED["trigger"])).seq == 352

    @pytest.mark.parametrize(
        "raw",
        [
            b"",
            b"\n",
            b"no header at all\n",
            b"6,1,2;too few fields\n",
            b"x,1,2,-;pri not a number\n",
            b"6,-1,2,-;negative seq\n",
            b"6,1, 2,-;space in ts\n",
            b"6,1,2_0,-;underscore\n",
            b"6,1,\xd9\xa3,-;arabic-indic digit\n",
            b"6,1,2,;empty flags\n",
            b"6,1,2,-,junk;extra field without =\n",
            b"6,1,2,-;msg\nKEY=no leading space\n",
            b"6,1,2,-;msg\n KEYNOEQUALS\n",
            b"6,1,2,-;msg\n\n K=V\n",
            b"6,1,99999999999999999999999999,-;huge ts\n",
        ],
    )
    def test_malformed_is_none(self, raw):
        """Malformed records give None."""
        assert parse_record(raw) is None

    def test_not_bytes_is_none(self):
        """Non-bytes input gives None instead of raising."""
        assert parse_record("6,1,2,-;str") is None  # type: ignore[arg-type]
        assert parse_record(None) is None  # type: ignore[arg-type]


class TestClassifyExt4Error:
    def test_trigger_fs_error(self):
        """trigger_fs_error's line (no inode) gives fs.error with function, line, comm, text."""
        o = obs_of(CAPTURED["trigger"])
        assert (o.kind, o.source, o.fs) == ("fs.error", "kmsg", "ext4")
        assert o.device.name == "loop0" and o.device.devnum is None
        k = o.kernel
        assert (k.function, k.line, k.comm, k.message, k.inode, k.block, k.errno) == (
            "trigger_test_error", 129, "python", "hello", None, None, None)
        assert o.severity is None and o.count == 1

    def test_time_is_boot_plus_timestamp(self):
        """time is boot_wallclock + ts_usec/1e6."""
        assert obs_of(CAPTURED["trigger"]).time == pytest.approx(BOOT + 6502.543038, abs=1e-6)

    def test_inode_form(self):
        """The __ext4_error_inode form gives inode, comm and the trailing text."""
        k = obs_of(FROM_SOURCE["lookup_deleted"]).kernel
        assert (k.function, k.line, k.inode, k.comm, k.message) == (
            "ext4_lookup", 1789, 12, "ls", "deleted inode referenced: 18")

    def test_captured_inode_checksum(self):
        """A captured inode checksum error keeps the colon inside the text."""
        o = obs_of(CAPTURED["lookup"])
        assert (o.kernel.inode, o.kernel.comm, o.kernel.message) == (15, "cat", "iget: checksum invalid")

    def test_fill_super(self):
        """An error while mounting names __ext4_fill_super and the root inode."""
        k = obs_of(CAPTURED["fill_super"]).kernel
        assert (k.function, k.line, k.inode, k.comm, k.message) == (
            "__ext4_fill_super", 5544, 2, "mount", "iget: special inode unallocated")

    def test_inode_and_block(self):
        """'inode #I: block B:' fills inode and block."""
        k = obs_of(FROM_SOURCE["inode_block"]).kernel
        assert (k.inode, k.block, k.comm, k.message) == (12, 1234, "ls", "reading directory lblock 0")

    def test_file_path(self):
        """__ext4_error_file's 'path P:' goes to details, not into the message."""
        o = obs_of(FROM_SOURCE["file_path"])
        assert o.details["path"] == "/mnt/d"
        assert o.kernel.message == "bad entry in directory: rec_len is zero"

    def test_bitmap(self):
        """A bitmap checksum error keeps 'bg N:' in the message."""
        k = obs_of(FROM_SOURCE["bitmap"]).kernel
        assert (k.function, k.comm, k.message) == ("ext4_validate_block_bitmap", "x", "bg 0: bad block bitmap checksum")

    @pytest.mark.parametrize(
        ("errstr", "code"),
        [
            ("IO failure", errno.EIO),
            ("Out of memory", errno.ENOMEM),
            ("Corrupt filesystem", errno.EUCLEAN),
            ("Filesystem failed CRC", errno.EBADMSG),
            ("Readonly filesystem", errno.EROFS),
            ("Journal has aborted", errno.EROFS),
            ("error 28", errno.ENOSPC),
            ("error -122", errno.EDQUOT),
        ],
    )
    def test_std_error(self, errstr, code):
        """The 'in FUNC:LINE: ERRSTR' form maps ext4_decode_error's text to errno."""
        raw = f"2,13,5000003,-;EXT4-fs error (device loop0) in ext4_reserve_inode_write:5712: {errstr}\n".encode()
        o = obs_of(raw)
        assert (o.kind, o.kernel.function, o.kernel.line, o.kernel.errno, o.kernel.message) == (
            "fs.error", "ext4_reserve_inode_write", 5712, code, errstr)
        assert o.kernel.comm is None

    def test_std_error_unknown_text(self):
        """An unknown ERRSTR leaves errno unset."""
        assert obs_of(b"2,1,1,-;EXT4-fs error (device loop0) in f:1: Something else\n").kernel.errno is None

    def test_group_locked(self):
        """__ext4_grp_locked_error's 'group G,' goes to details."""
        o = obs_of(FROM_SOURCE["grp"])
        assert o.details == {"group": 3}
        assert o.kernel.message == "block bitmap and bg descriptor inconsistent: 100 vs 99 free clusters"

    def test_group_locked_inode_block(self):
        """'group G, inode I: block B:' fills inode and block."""
        o = obs_of(FROM_SOURCE["grp_inode_block"])
        assert (o.details["group"], o.kernel.inode, o.kernel.block, o.kernel.message) == (
            1, 12, 3300, "freeing already freed block")

    def test_group_locked_split_continuation(self):
        """A group line cut at its KERN_CONT boundary still gives fs.error."""
        o = obs_of(b"2,1,1,-;EXT4-fs error (device loop0): ext4_mb_generate_buddy:1217: group 3, \n")
        assert o.kind == "fs.error" and o.details == {"group": 3} and o.kernel.message == ""

    def test_without_device(self):
        """'EXT4-fs error:' without a device gives device None."""
        o = obs_of(FROM_SOURCE["nodev"])
        assert (o.kind, o.device, o.kernel.function, o.kernel.message) == ("fs.error", None, "ext4_fill_super",
                                                                           "no device")

    def test_caller_pid(self):
        """A 'caller=T<pid>' header field becomes kernel.pid."""
        o = obs_of(b"2,1,1,-,caller=T4242;EXT4-fs error (device loop0): f:1: comm x: y\n")
        assert o.kernel.pid == 4242
        assert obs_of(b"2,1,1,-,caller=C1;EXT4-fs error (device loop0): f:1: comm x: y\n").kernel.pid is None

    def test_unparseable_ext4_error(self):
        """An 'EXT4-fs error' line without FUNC:LINE gives None."""
        assert obs_of(b"2,1,1,-;EXT4-fs error (device loop0) something odd\n") is None


class TestClassifyExt4Warning:
    def test_inode_warning(self):
        """__ext4_warning_inode's form gives fs.warning with inode and comm."""
        o = obs_of(FROM_SOURCE["dx_full"])
        assert o.kind == "fs.warning" and o.device.name == "loop0"
        k = o.kernel
        assert (k.function, k.line, k.inode, k.comm, k.message) == (
            "ext4_dx_add_entry", 2604, 2, "x", "Directory index full!")

    def test_plain_warning(self):
        """__ext4_warning's form (no comm) keeps the whole text."""
        k = obs_of(FROM_SOURCE["warning"]).kernel
        assert (k.function, k.line, k.comm, k.message) == (
            "ext4_multi_mount_protect", 305, None, "MMP interval 42 higher than expected")

    def test_end_bio(self):
        """ext4_end_bio's write error gives inode, block and the blk_status as errno."""
        o = obs_of(CAPTURED["end_bio"])
        assert o.kind == "fs.warning"
        assert (o.kernel.inode, o.kernel.block, o.kernel.errno) == (12, 21761, errno.ENOSPC)
        assert o.details == {"blk_status": 3}


class TestClassifyState:
    def test_remount_read_only(self):
        """'Remounting filesystem read-only' gives fs.readonly."""
        o = obs_of(CAPTURED["remount_ro"])
        assert (o.kind, o.device.name, o.fs, o.details) == ("fs.readonly", "loop0", "ext4",
                                                            {"reason": "errors_remount_ro"})

    def test_journal_abort(self):
        """'Aborting journal on device loop0-8.' gives fs.readonly on loop0."""
        o = obs_of(CAPTURED["abort"])
        assert (o.kind, o.device.name) == ("fs.readonly", "loop0")
        assert o.details == {"reason": "journal_aborted", "journal": "loop0-8"}

    def test_shutdown(self):
        """'shut down requested (1)' gives fs.shutdown with the flags."""
        o = obs_of(CAPTURED["shutdown"])
        assert (o.kind, o.device.name, o.details) == ("fs.shutdown", "loop0", {"flags": 1, "mode": "logflush"})

    def test_mount_failed(self):
        """'mount failed' gives fs.mount_failed with that text (the reason is the source's job)."""
        o = obs_of(CAPTURED["mount_failed"])
        assert (o.kind, o.device.name, o.kernel.message) == ("fs.mount_failed", "loop0", "mount failed")

    @pytest.mark.parametrize("name", ["mounted", "unmounting", "root_failed", "cant_find"])
    def test_other_ext4_messages(self, name):
        """Other 'EXT4-fs (dev):' lines give None."""
        assert obs_of(CAPTURED[name]) is None


class TestJournalDevice:
    @pytest.mark.parametrize(
        ("journal", "device"),
        [("loop0-8", "loop0"), ("nvme0n1p2-8", "nvme0n1p2"), ("dm-3-8", "dm-3"), ("dm-3", "dm-3"), ("sdb", "sdb")],
    )
    def test_strips_inode_suffix(self, journal, device):
        """An internal journal's '-<inode>' suffix is stripped; an external journal's name is kept."""
        assert journal_device(journal) == device


class TestClassifyBlock:
    def test_io_error(self):
        """blk_print_req_error's I/O line gives blk.io_error with sector, op and EIO."""
        o = obs_of(FROM_SOURCE["io_read"])
        assert (o.kind, o.device.name, o.kernel.block, o.kernel.errno) == ("blk.io_error", "loop3", 16784, errno.EIO)
        assert o.details == {"sector": 16784, "op": "READ", "error": "I/O", "flags": 0}

    def test_critical_space(self):
        """'critical space allocation' (a loop over a full file system) maps to ENOSPC."""
        o = obs_of(CAPTURED["nospc"])
        assert (o.kernel.errno, o.kernel.block, o.details["op"], o.details["error"]) == (
            errno.ENOSPC, 8192, "WRITE", "critical space allocation")

    @pytest.mark.parametrize(("name", "code"), [("timeout", errno.ETIMEDOUT), ("target", errno.EREMOTEIO),
                                                ("unknown_status", errno.EIO)])
    def test_status_errno(self, name, code):
        """The status name maps to its blk_errors[] errno, unknown names to EIO."""
        assert obs_of(FROM_SOURCE[name]).kernel.errno == code

    def test_device_property(self):
        """DEVICE=bMAJ:MIN fills the device's major and minor."""
        d = obs_of(FROM_SOURCE["io_props"]).device
        assert (d.major, d.minor, d.name) == (7, 3, "loop3")

    def test_old_prefix_and_unknown_disk(self):
        """The pre-5.x 'blk_update_request:' prefix parses; disk '?' gives no device."""
        o = obs_of(b"3,1,1,-;blk_update_request: I/O error, dev ?, sector 8 op 0x0:(READ) flags 0x0 phys_seg 1 prio "
                   b"class 0\n")
        assert (o.kind, o.device, o.details["error"]) == ("blk.io_error", None, "I/O")

    def test_buffer_io_error_dev(self):
        """fs/buffer.c's 'Buffer I/O error on dev' gives the logical block and its context."""
        o = obs_of(CAPTURED["buffer_dev"])
        assert (o.kind, o.device.name, o.kernel.block, o.kernel.errno) == ("blk.io_error", "loop0", 2560, errno.EIO)
        assert o.details == {"logical_block": 2560, "buffer": True, "context": "lost async page write"}

    def test_buffer_io_error_device(self):
        """ext4's own 'Buffer I/O error on device' form gives the logical block."""
        o = obs_of(CAPTURED["buffer_device"])
        assert (o.device.name, o.kernel.block, o.details) == ("loop0", 20481, {"logical_block": 20481, "buffer": True})

    def test_capacity_change(self):
        """'detected capacity change' gives None."""
        assert obs_of(CAPTURED["capacity"]) is None


class TestClassifyTrust:
    def test_user_written_copy_is_ignored(self):
        """An ext4 line written from user space (facility != 0) gives None by default."""
        raw = b"11,5,1,-;EXT4-fs error (device loop0): trigger_test_error:129: comm bash: hello\n"
        assert obs_of(raw) is None
        assert obs_of(raw, kernel_only=False).kind == "fs.error"

    def test_unrelated_kernel_lines(self):
        """Kernel lines of other subsystems give None."""
        for name in ("rcu_tab", "amd_nl", "user", "capacity"):
            assert obs_of(CAPTURED[name]) is None

    def test_every_kind_is_known(self):
        """Every observation made from the sample lines has a schema kind."""
        for raw in ALL_LINES:
            o = obs_of(raw)
            assert o is None or o.kind in KINDS

    def test_broken_record_does_not_raise(self):
        """classify of a record with nonsense values gives None instead of raising."""
        rec = KmsgRecord(seq=1, ts_usec="x", level=2, facility=0, message="EXT4-fs (loop0): mount failed", props={})  # type: ignore[arg-type]
        assert classify(rec, BOOT) is None


# ---- fuzzing: parse_record + classify never raise -----------------------------------------

INTERESTING = [
    "EXT4-fs error (device ", "EXT4-fs warning (device ", "EXT4-fs (", "EXT4-fs error: ", " in ",
    ": comm ", "inode #", "block ", "group ", ", inode ", "path ", "Aborting journal on device ",
    "Buffer I/O error on dev", " error, dev ", ", sector ", " op 0x", ":(READ) flags 0x", "\\x", "\n ",
    "=", ":", "1", "-8.", "(1)", "mount failed", "shut down requested (", "I/O error ", "9" * 30,
]


def _check(raw: bytes) -> None:
    rec = parse_record(raw)
    if rec is not None:
        for kernel_only in (True, False):
            o = classify(rec, BOOT, kernel_only=kernel_only)
            assert o is None or (isinstance(o, Observation) and o.kind in KINDS)


class TestFuzz:
    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.binary(max_size=600))
    def test_random_bytes(self, raw):
        """Random bytes never make parse_record or classify raise."""
        _check(raw)

    @settings(max_examples=400, deadline=None)
    @given(st.sampled_from(ALL_LINES), st.data())
    def test_truncated_records(self, line, data):
        """Every truncation of a valid record is handled."""
        start = data.draw(st.integers(0, len(line)))
        end = data.draw(st.integers(start, len(line)))
        _check(line[:end])
        _check(line[start:end])

    @settings(max_examples=600, deadline=None)
    @given(st.sampled_from(ALL_LINES), st.lists(st.tuples(st.integers(0, 10_000), st.binary(max_size=4),
                                                          st.integers(0, 3)), max_size=6))
    def test_mutated_records(self, line, edits):
        """Byte replacements, insertions and deletions in valid records are handled."""
        buf = bytearray(line)
        for pos, chunk, how in edits:
            pos %= len(buf) + 1
            if how == 0:
                buf[pos:pos] = chunk
            elif how == 1:
                del buf[pos:pos + len(chunk) + 1]
            else:
                buf[pos:pos + len(chunk)] = chunk
        _check(bytes(buf))

    @settings(max_examples=600, deadline=None)
    @given(st.integers(0, 255), st.lists(st.one_of(st.sampled_from(INTERESTING), st.text(max_size=12)), max_size=14))
    def test_near_miss_messages(self, pri, parts):
        """Messages built from pieces of the recognised formats are handled (deep regex paths)."""
        msg = "".join(parts).encode("utf-8", "surrogatepass")
        _check(b"%d,7,123,-;" % pri + msg + b"\n")

    def test_long_message_is_fast(self):
        """A maximal adversarial message is classified in well under a millisecond per KiB."""
        msg = b"EXT4-fs error (device loop0): f:1: " + b"path " * 1600
        blk = b"x" * 4000 + b" error, dev " + b"y" * 4000
        t0 = time.perf_counter()
        for body in (msg, blk):
            _check(b"0,1,2,-;" + body + b"\n")
        assert time.perf_counter() - t0 < 0.5


# ---- the reading loop ---------------------------------------------------------------------


class SeqpacketReader:
    """A stand-in for /dev/kmsg: a SOCK_SEQPACKET socketpair keeps record boundaries (one recv,
    one record) and gives real readiness and EAGAIN. The marker record makes read() raise EPIPE.

    Not /dev/kmsg itself: an overrun needs the kernel ring buffer to wrap under a slow reader,
    which on a shared machine would flood every other reader's log and lose their records.
    """

    EPIPE = b"\0EPIPE"

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.ours.setblocking(False)
        self.reads = 0
        self.closed = False

    def fileno(self) -> int:
        return self.ours.fileno()

    def read(self) -> bytes:
        data = self.ours.recv(8192)
        self.reads += 1
        if data == self.EPIPE:
            raise BrokenPipeError(errno.EPIPE, "records overwritten")
        return data

    def close(self) -> None:
        self.closed = True
        self.ours.close()

    def feed(self, *records: bytes) -> None:
        for r in records:
            self.theirs.send(r)


def rec(seq: int, text: str = "unrelated line", pri: int = 6, ts: int = 1_000_000) -> bytes:
    return f"{pri},{seq},{ts},-;{text}\n".encode()


async def _until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.001)


def drive(records: list[bytes], **kw) -> tuple[list[Observation], KmsgSource, SeqpacketReader]:
    """Run a KmsgSource over the records; return what it sent once it has read them all."""
    reader = SeqpacketReader()
    src = KmsgSource(opener=lambda path: reader, boot_wallclock=BOOT, **kw)
    got: list[Observation] = []

    async def main() -> None:
        ready = asyncio.Event()
        task = asyncio.create_task(src.run(got.append, ready.set))
        await asyncio.wait_for(ready.wait(), 5)
        # From a thread: a burst can exceed the socket buffer, and the loop must keep reading.
        await asyncio.wait_for(asyncio.to_thread(reader.feed, *records), 10)
        await _until(lambda: reader.reads >= len(records) or task.done())
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())
    reader.theirs.close()
    return got, src, reader


ERR = "EXT4-fs error (device loop0): trigger_test_error:129: comm bash: hello"


class TestKmsgSource:
    def test_sends_recognised_records(self):
        """Recognised records become observations in order; others are only counted."""
        got, src, _ = drive([rec(1), rec(2, ERR, pri=2), rec(3),
                             rec(4, "EXT4-fs (loop0): Remounting filesystem read-only", 2)])
        assert [o.kind for o in got] == ["fs.error", "fs.readonly"]
        assert got[0].time == pytest.approx(BOOT + 1.0)
        assert (src.records_read, src.lost_total, src.malformed) == (4, 0, 0)

    def test_seq_gap_is_events_lost(self):
        """A hole in sequence numbers becomes one events.lost with the hole's size."""
        got, src, _ = drive([rec(10), rec(11), rec(15, ERR, pri=2)])
        assert [o.kind for o in got] == ["events.lost", "fs.error"]
        lost = got[0]
        assert (lost.source, lost.count, lost.details["reason"]) == ("kmsg", 3, "kmsg_overrun")
        assert (lost.details["first_seq"], lost.details["last_seq"]) == (12, 14)
        assert src.lost_total == 3

    def test_epipe_then_continue(self):
        """EPIPE (overrun) does not stop reading; the skipped records are counted once."""
        got, src, _ = drive([rec(1), rec(2), SeqpacketReader.EPIPE, rec(40, ERR, pri=2), rec(41, ERR, pri=2)])
        assert [(o.kind, o.count) for o in got] == [("events.lost", 37), ("fs.error", 1), ("fs.error", 1)]
        assert (src.overruns, src.lost_total, src.records_read) == (1, 37, 4)

    def test_epipe_before_first_record(self):
        """An overrun before any record was read is reported with an unknown size."""
        got, src, _ = drive([SeqpacketReader.EPIPE, rec(500)])
        assert [(o.kind, o.count, o.details.get("exact")) for o in got] == [("events.lost", 1, False)]

    def test_first_record_sets_baseline(self):
        """The first record read after start is no gap, whatever its sequence number."""
        got, src, _ = drive([rec(12345), rec(12346)])
        assert got == [] and src.lost_total == 0

    def test_malformed_is_counted(self):
        """A malformed read is counted and skipped."""
        got, src, _ = drive([b"garbage", rec(1, ERR, pri=2)])
        assert [o.kind for o in got] == ["fs.error"] and src.malformed == 1

    def test_user_records_are_ignored(self):
        """An ext4 line written from user space makes no observation by default."""
        got, _, _ = drive([rec(1, ERR, pri=11)])
        assert got == []

    def test_mount_failed_takes_reason(self):
        """'mount failed' carries the text of the device's line just before it."""
        got, _, _ = drive([
            rec(379, "EXT4-fs error (device loop0): __ext4_fill_super:5544: inode #2: comm mount: "
                     "iget: special inode unallocated", 2),
            rec(380, "EXT4-fs (loop0): get root inode failed", 3),
            rec(381, "EXT4-fs (loop0): mount failed", 3),
        ])
        failed = got[-1]
        assert failed.kind == "fs.mount_failed"
        assert failed.kernel.message == "get root inode failed"
        assert failed.details == {"reason": "get root inode failed"}

    def test_mount_failed_ignores_stale_or_foreign_reason(self):
        """A reason of another device, or too old, is not used."""
        got, _, _ = drive([
            rec(1, "EXT4-fs (loop1): get root inode failed", 3, ts=1_000_000),
            rec(2, "EXT4-fs (loop0): get root inode failed", 3, ts=1_000_000),
            rec(3, "EXT4-fs (loop0): mount failed", 3, ts=9_000_000),
            rec(4, "EXT4-fs (loop2): mount failed", 3, ts=9_000_000),
        ])
        assert [o.kernel.message for o in got] == ["mount failed", "mount failed"]

    def test_cancel_removes_reader_and_closes(self):
        """Cancelling run() removes the fd from the loop and closes the reader."""
        reader = SeqpacketReader()
        src = KmsgSource(opener=lambda path: reader)

        async def main() -> bool:
            ready = asyncio.Event()
            task = asyncio.create_task(src.run(lambda o: None, ready.set))
            await ready.wait()
            fd = reader.fileno()
            await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return asyncio.get_running_loop().remove_reader(fd)

        assert asyncio.run(main()) is False
        assert reader.closed

    def test_ready_after_open(self):
        """ready() is called once, after the reader is open."""
        calls: list[str] = []
        reader = SeqpacketReader()

        def opener(path: str) -> SeqpacketReader:
            calls.append(f"open {path}")
            return reader

        async def main() -> None:
            source = KmsgSource("/dev/x", opener=opener)
            task = asyncio.create_task(source.run(lambda o: None, lambda: calls.append("ready")))
            await _until(lambda: "ready" in calls)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        asyncio.run(main())
        assert calls == ["open /dev/x", "ready"]

    def test_open_failure_is_unavailable(self, tmp_path):
        """A path that cannot be opened raises SourceUnavailable with a hint, before ready()."""
        ready_calls = []
        with pytest.raises(SourceUnavailable) as info:
            asyncio.run(KmsgSource(str(tmp_path / "missing")).run(lambda o: None, lambda: ready_calls.append(1)))
        assert "missing" in info.value.reason and info.value.hint
        assert ready_calls == []

    def test_permission_denied_hint(self):
        """EACCES names the capability needed."""
        def opener(path: str):
            raise PermissionError(errno.EACCES, "Permission denied", path)

        with pytest.raises(SourceUnavailable) as info:
            asyncio.run(KmsgSource(opener=opener).run(lambda o: None, lambda: None))
        assert "CAP_SYSLOG" in info.value.hint

    def test_end_of_file_fails(self):
        """End of file on the reader ends run() with SourceFailed and closes the reader."""
        reader = SeqpacketReader()

        async def main() -> None:
            ready = asyncio.Event()
            task = asyncio.create_task(KmsgSource(opener=lambda p: reader).run(lambda o: None, ready.set))
            await ready.wait()
            reader.theirs.close()
            await asyncio.wait_for(task, 5)

        with pytest.raises(SourceFailed):
            asyncio.run(main())
        assert reader.closed

    def test_read_error_fails(self):
        """A read error other than EAGAIN/EPIPE/EINTR ends run() with SourceFailed."""

        class Failing(SilentReader):
            def read(self) -> bytes:
                raise OSError(errno.EIO, "Input/output error")

        reader = Failing([])
        os.write(reader.w, b"x")  # readable

        with pytest.raises(SourceFailed, match="Input/output error"):
            asyncio.run(KmsgSource(opener=lambda p: reader).run(lambda o: None, lambda: None))
        assert reader.closed

    def test_send_failure_surfaces(self):
        """An exception raised by send ends run() instead of vanishing into the loop's log."""
        reader = SeqpacketReader()

        def send(o: Observation) -> None:
            raise RuntimeError("sink broken")

        async def main() -> None:
            ready = asyncio.Event()
            task = asyncio.create_task(KmsgSource(opener=lambda p: reader).run(send, ready.set))
            await ready.wait()
            reader.feed(rec(1, ERR, pri=2))
            await asyncio.wait_for(task, 5)

        with pytest.raises(RuntimeError, match="sink broken"):
            asyncio.run(main())
        assert reader.closed

    def test_batches_yield_to_the_loop(self):
        """A burst larger than one batch is still read completely."""
        records = [rec(i, ERR, pri=2) for i in range(1, 2001)]
        got, src, _ = drive(records, batch=16)
        assert len(got) == 2000 and src.records_read == 2000 and src.lost_total == 0

    def test_real_dev_kmsg_opener_reads_nothing_old(self, tmp_path):
        """The default opener seeks to the end: nothing already in the file is read."""
        from fsnotifyd.sources.kmsg import open_kmsg

        path = tmp_path / "kmsg"
        path.write_bytes(rec(1, ERR, pri=2))
        reader = open_kmsg(str(path))
        try:
            assert reader.read() == b""
        finally:
            reader.close()


class SilentReader:
    """Records that are there to read while the fd never signals readiness, as between a printk
    and the timer tick that runs the kernel's deferred reader wake-up."""

    def __init__(self, records: list[bytes]) -> None:
        self.r, self.w = os.pipe()
        self.records = list(records)
        self.closed = False

    def fileno(self) -> int:
        return self.r

    def read(self) -> bytes:
        if not self.records:
            raise BlockingIOError(errno.EAGAIN, "no record")
        return self.records.pop(0)

    def close(self) -> None:
        self.closed = True
        os.close(self.r)
        os.close(self.w)


class TestPollInterval:
    def _run(self, poll_interval: float | None) -> list[Observation]:
        reader = SilentReader([rec(1, ERR, pri=2)])
        got: list[Observation] = []

        async def main() -> None:
            task = asyncio.create_task(
                KmsgSource(opener=lambda p: reader, poll_interval=poll_interval).run(got.append, lambda: None))
            with contextlib.suppress(AssertionError):
                await _until(lambda: got, timeout=0.3)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        asyncio.run(main())
        assert reader.closed
        return got

    def test_timer_drains_without_readiness(self):
        """With poll_interval, records are read even before the fd signals readiness."""
        assert [o.kind for o in self._run(0.005)] == ["fs.error"]

    def test_no_timer_by_default(self):
        """Without poll_interval, only readiness wakes the reader."""
        assert self._run(None) == []


class TestBootWallclock:
    def test_matches_monotonic(self):
        """boot_wallclock() + CLOCK_MONOTONIC is now."""
        assert boot_wallclock() + time.clock_gettime(time.CLOCK_MONOTONIC) == pytest.approx(time.time(), abs=0.05)

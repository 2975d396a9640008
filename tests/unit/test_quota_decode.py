"""quota.decode on datagrams built byte by byte per include/uapi/linux/quota.h (no kernel needed).

The encoder below is written from the uapi header and fs/quota/netlink.c, independently of
fsnotifyd.sources.quota: nlmsghdr (len u32, type u16, flags u16, seq u32, pid u32), genlmsghdr
(cmd u8, version u8, reserved u16), then attributes (nla_len u16, nla_type u16, payload, padded
to 4 bytes), everything in host byte order.

Poisoning: a message whose netlink header is sane is rejected alone (its nlmsg_len says where
the next one starts); a broken header (shorter than 16 bytes, nlmsg_len < 16, nlmsg_len past
the datagram) ends the datagram, since nothing after it can be delimited.
"""

from __future__ import annotations

import struct

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from fsnotifyd.events import Device
from fsnotifyd.kernel.quota import decode
from fsnotifyd.sources.quota import QuotaSource

FAMILY_ID = 0x11  # what this kernel allocated; any id works as long as both sides agree
NOW = 1700000000.5

# uapi numbers, written out again on purpose (not imported from the code under test)
A_QTYPE, A_EXCESS_ID, A_WARNING, A_DEV_MAJOR, A_DEV_MINOR, A_CAUSED_ID, A_PAD = 1, 2, 3, 4, 5, 6, 7
C_WARNING = 1

# code -> (name, resource, limit, grace_expired, below, severity)
EXPECTED = {
    0: ("NOWARN", None, None, False, False, "info"),
    1: ("IHARDWARN", "inodes", "hard", False, False, "error"),
    2: ("ISOFTLONGWARN", "inodes", "soft", True, False, "error"),
    3: ("ISOFTWARN", "inodes", "soft", False, False, "warning"),
    4: ("BHARDWARN", "blocks", "hard", False, False, "error"),
    5: ("BSOFTLONGWARN", "blocks", "soft", True, False, "error"),
    6: ("BSOFTWARN", "blocks", "soft", False, False, "warning"),
    7: ("IHARDBELOW", "inodes", "hard", False, True, "info"),
    8: ("ISOFTBELOW", "inodes", "soft", False, True, "info"),
    9: ("BHARDBELOW", "blocks", "hard", False, True, "info"),
    10: ("BSOFTBELOW", "blocks", "soft", False, True, "info"),
}
QTYPES = {0: "user", 1: "group", 2: "project"}


# --- an independent encoder ---------------------------------------------------------------------
def u32(v: int) -> bytes:
    return struct.pack("=I", v)


def u64(v: int) -> bytes:
    return struct.pack("=Q", v)


def attr(kind: int, payload: bytes, *, nla_len: int | None = None) -> bytes:
    n = 4 + len(payload) if nla_len is None else nla_len
    raw = struct.pack("=HH", n, kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def nlmsg(body: bytes, *, mtype: int = FAMILY_ID, flags: int = 0, seq: int = 1, pid: int = 0,
          nlmsg_len: int | None = None) -> bytes:
    n = 16 + len(body) if nlmsg_len is None else nlmsg_len
    raw = struct.pack("=IHHII", n, mtype, flags, seq, pid) + body
    return raw + b"\0" * (-len(raw) % 4)


def genl(cmd: int = C_WARNING, version: int = 1) -> bytes:
    return struct.pack("=BBH", cmd, version, 0)


def warning_attrs(qtype: int = 0, excess_id: int = 1000, warning: int = 4, major: int = 7,
                  minor: int = 3, caused_id: int | None = 1000, *, pad: bool = False) -> list[bytes]:
    """The attributes in the kernel's order (quota_send_warning); ``pad`` puts the PAD attribute
    nla_put_u64_64bit inserts on architectures that need 8-byte alignment."""
    attrs = [attr(A_QTYPE, u32(qtype))]
    if pad:
        attrs.append(attr(A_PAD, b""))
    attrs += [attr(A_EXCESS_ID, u64(excess_id)), attr(A_WARNING, u32(warning)),
              attr(A_DEV_MAJOR, u32(major)), attr(A_DEV_MINOR, u32(minor))]
    if caused_id is not None:
        if pad:
            attrs.append(attr(A_PAD, b""))
        attrs.append(attr(A_CAUSED_ID, u64(caused_id)))
    return attrs


def warning_msg(*args, pad: bool = False, **kw) -> bytes:
    return nlmsg(genl() + b"".join(warning_attrs(*args, pad=pad, **kw)))


def one(data: bytes):
    res = decode(data, FAMILY_ID, NOW)
    assert len(res.observations) + len(res.malformed) == res.messages
    return res


def rejected(data: bytes) -> tuple[str, str]:
    res = one(data)
    assert res.observations == [] and len(res.malformed) == 1, res
    return res.malformed[0].reason, res.malformed[0].field


# --- good messages ------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", sorted(QTYPES))
@pytest.mark.parametrize("code", sorted(EXPECTED))
def test_every_warning_and_quota_type(code: int, qtype: int) -> None:
    res = one(warning_msg(qtype, 4242, code, 253, 17, 1001))
    [obs] = res.observations
    name, resource, limit, grace, below, severity = EXPECTED[code]
    assert (obs.source, obs.kind, obs.time) == ("quota", "quota.warning", NOW)
    assert obs.device == Device(253, 17, None)
    assert obs.severity == severity
    w = obs.details["warning"]
    assert {k: v for k, v in obs.details.items() if k != "warning"} == {
        "quota_type": QTYPES[qtype], "id": 4242, "caused_id": 1001}
    assert (w["code"], w["name"], w["resource"], w["limit"], w["grace_expired"], w["below"]) == (
        code, name, resource, limit, grace, below)
    assert isinstance(w["text"], str) and "4242" in w["text"] and "253:17" in w["text"]
    assert QTYPES[qtype] in w["text"].lower()
    assert set(w) == {"code", "name", "resource", "limit", "grace_expired", "below", "text"}


def test_texts_say_what_happened() -> None:
    texts = {c: one(warning_msg(0, 5, c)).observations[0].details["warning"]["text"] for c in EXPECTED}
    assert "block hard limit" in texts[4] and "fail" in texts[4]
    assert "grace" in texts[2] and "inode" in texts[2]
    assert "below" in texts[10] and "block soft limit" in texts[10]
    assert len(set(texts.values())) == len(texts)


def test_pad_before_u64s_and_largest_values() -> None:
    big = (1 << 64) - 1
    [obs] = one(warning_msg(2, big, 5, 4095, (1 << 20) - 1, big, pad=True)).observations
    assert obs.details["id"] == big and obs.details["caused_id"] == big
    assert obs.device == Device(4095, (1 << 20) - 1, None)
    assert obs.details["quota_type"] == "project"


def test_caused_id_is_optional_and_unknown_attributes_are_skipped() -> None:
    body = genl() + b"".join(warning_attrs(caused_id=None)) + attr(42, b"future!")
    [obs] = one(nlmsg(body)).observations
    assert obs.details["caused_id"] is None


def test_attribute_order_does_not_matter_and_version_is_not_checked() -> None:
    attrs = warning_attrs(1, 77, 6, 8, 1, 0)
    [obs] = one(nlmsg(genl(version=2) + b"".join(reversed(attrs)))).observations
    assert obs.details["quota_type"] == "group" and obs.details["warning"]["name"] == "BSOFTWARN"


def test_several_messages_in_one_datagram() -> None:
    data = b"".join(warning_msg(q, 100 + i, c, 7, i) for i, (q, c) in enumerate([(0, 4), (1, 3), (2, 9)]))
    res = one(data)
    assert res.messages == 3 and res.malformed == []
    assert [(o.details["id"], o.details["quota_type"], o.details["warning"]["code"], o.device.minor)
            for o in res.observations] == [(100, "user", 4, 0), (101, "group", 3, 1), (102, "project", 9, 2)]


# --- malformed messages -------------------------------------------------------------------------
GOOD = warning_msg()
BODY = genl() + b"".join(warning_attrs())


def without(kind: int) -> bytes:
    return genl() + b"".join(a for a in warning_attrs() if struct.unpack_from("=H", a, 2)[0] != kind)


MALFORMED = {
    "empty datagram": (b"", "empty datagram", "nlmsghdr"),
    "truncated header": (GOOD[:10], "truncated netlink header: 10 bytes left, need 16", "nlmsghdr"),
    "nlmsg_len below header": (nlmsg(BODY, nlmsg_len=8), "nlmsg_len 8 is shorter than the 16-byte", "nlmsg_len"),
    "nlmsg_len past buffer": (nlmsg(BODY, nlmsg_len=len(GOOD) + 4),
                              f"nlmsg_len {len(GOOD) + 4} runs past the end of the datagram ({len(GOOD)} bytes left)",
                              "nlmsg_len"),
    "wrong family": (nlmsg(BODY, mtype=0x12), "message type 0x12, expected family id 0x11 (VFS_DQUOT)", "nlmsg_type"),
    "netlink error message": (nlmsg(struct.pack("=i", -95) + GOOD[:16], mtype=2),
                              "message type 0x2 (NLMSG_ERROR), expected family id 0x11", "nlmsg_type"),
    "no genl header": (nlmsg(b"\x01\x01"), "message of 18 bytes has no room for the 4-byte genetlink header",
                       "genlmsghdr"),
    "wrong cmd": (nlmsg(genl(cmd=2) + BODY[4:]), "genetlink command 2, expected 1 (QUOTA_NL_C_WARNING)", "cmd"),
    "cmd 0": (nlmsg(genl(cmd=0) + BODY[4:]), "genetlink command 0, expected 1", "cmd"),
    "attribute past message": (nlmsg(genl() + attr(A_WARNING, u32(4), nla_len=40)),
                               "attribute WARNING at offset 20 has nla_len 40, past the end of the message "
                               "(8 bytes left)",
                               "WARNING"),
    "attribute shorter than its header": (nlmsg(genl() + attr(A_QTYPE, u32(0), nla_len=2)),
                                          "attribute QTYPE at offset 20 has nla_len 2, shorter than its 4-byte header",
                                          "QTYPE"),
    "WARNING of 2 bytes": (nlmsg(without(A_WARNING) + attr(A_WARNING, b"\x04\x00")),
                           "attribute WARNING has length 2, expected 4", "WARNING"),
    "EXCESS_ID of 4 bytes": (nlmsg(without(A_EXCESS_ID) + attr(A_EXCESS_ID, u32(1000))),
                             "attribute EXCESS_ID has length 4, expected 8", "EXCESS_ID"),
    "missing WARNING": (nlmsg(without(A_WARNING)), "missing attribute WARNING", "WARNING"),
    "missing three": (nlmsg(genl() + attr(A_QTYPE, u32(0)) + attr(A_WARNING, u32(4))),
                      "missing attributes EXCESS_ID, DEV_MAJOR, DEV_MINOR", "EXCESS_ID"),
    "no attributes at all": (nlmsg(genl()), "missing attributes QTYPE, EXCESS_ID, WARNING", "QTYPE"),
    "warning 11": (warning_msg(warning=11), "attribute WARNING is 11, expected 0..10", "WARNING"),
    "warning 2**32-1": (warning_msg(warning=0xFFFFFFFF), "attribute WARNING is 4294967295", "WARNING"),
    "qtype 3": (warning_msg(qtype=3), "attribute QTYPE is 3, expected 0 (user), 1 (group) or 2 (project)", "QTYPE"),
    "major too big": (warning_msg(major=4096), "attribute DEV_MAJOR is 4096, expected 0..4095", "DEV_MAJOR"),
    "minor too big": (warning_msg(minor=1 << 20), "attribute DEV_MINOR is 1048576, expected 0..1048575", "DEV_MINOR"),
    "duplicate": (nlmsg(BODY + attr(A_WARNING, u32(6))), "attribute WARNING appears twice", "WARNING"),
    "nested flag": (nlmsg(without(A_QTYPE) + attr(A_QTYPE | 0x8000, u32(0))),
                    "attribute QTYPE has flags 0x8000", "QTYPE"),
    "net byte order flag": (nlmsg(without(A_DEV_MAJOR) + attr(A_DEV_MAJOR | 0x4000, struct.pack(">I", 7))),
                            "attribute DEV_MAJOR has flags 0x4000", "DEV_MAJOR"),
    "trailing bytes": (struct.pack("=IHHII", 16 + len(BODY) + 2, FAMILY_ID, 0, 1, 0) + BODY + b"\0\0" + b"\0\0",
                       "2 trailing bytes after the last attribute", "attributes"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_is_rejected_with_a_reason(case: str) -> None:
    data, reason, field = MALFORMED[case]
    got_reason, got_field = rejected(data)
    assert got_reason.startswith(reason), got_reason
    assert got_field == field


def test_good_message_after_a_bad_one_still_decodes() -> None:
    bad = nlmsg(genl(cmd=2) + BODY[4:])
    res = one(bad + warning_msg(excess_id=7) + nlmsg(without(A_WARNING)) + warning_msg(excess_id=8))
    assert res.messages == 4
    assert [o.details["id"] for o in res.observations] == [7, 8]
    assert [m.field for m in res.malformed] == ["cmd", "WARNING"]


def test_bad_header_poisons_the_rest_of_the_datagram() -> None:
    # Good, then a header whose nlmsg_len is 8: the following message cannot be found.
    res = one(warning_msg(excess_id=1) + nlmsg(BODY, nlmsg_len=8) + warning_msg(excess_id=2))
    assert [o.details["id"] for o in res.observations] == [1]
    assert len(res.malformed) == 1 and res.malformed[0].field == "nlmsg_len"
    # A good message followed by a cut one: the good one counts.
    res = one(warning_msg(excess_id=3) + warning_msg(excess_id=4)[:30])
    assert [o.details["id"] for o in res.observations] == [3]
    assert res.malformed[0].reason == (f"nlmsg_len {len(GOOD)} runs past the end of the datagram "
                                       "(30 bytes left)")


def test_source_counts_and_logs_each_reason() -> None:
    src = QuotaSource()
    src.family_id = FAMILY_ID
    sent = []
    with structlog.testing.capture_logs() as logs:
        src.handle(warning_msg(warning=1) + nlmsg(without(A_WARNING) + attr(A_WARNING, b"\x04\x00")), sent.append, NOW)
        src.handle(GOOD[:10], sent.append, NOW)
    assert [o.details["warning"]["name"] for o in sent] == ["IHARDWARN"]
    st_ = src.status()
    assert (st_["received"], st_["warnings"], st_["malformed"]) == (3, 1, 2)
    assert st_["last_malformed"] == "truncated netlink header: 10 bytes left, need 16"
    warned = [e for e in logs if e["event"] == "quota.malformed"]
    assert [(e["field"], e["log_level"]) for e in warned] == [("WARNING", "warning"), ("nlmsghdr", "warning")]
    assert warned[0]["reason"] == "attribute WARNING has length 2, expected 4"


def test_fresh_source_status() -> None:
    assert QuotaSource().status() == {"received": 0, "warnings": 0, "malformed": 0, "last_malformed": None,
                                      "overruns": 0, "family_id": None, "group_id": None}


# --- fuzzing ------------------------------------------------------------------------------------
@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=400))
def test_random_garbage_never_raises(data: bytes) -> None:
    res = one(data)  # one() checks every message is either decoded or rejected
    assert res.messages >= 1
    for m in res.malformed:
        assert m.reason and m.field


_attr_kinds = st.sampled_from([A_QTYPE, A_EXCESS_ID, A_WARNING, A_DEV_MAJOR, A_DEV_MINOR, A_CAUSED_ID,
                               A_PAD, 0, 9, A_WARNING | 0x8000])
_attrs = st.builds(attr, _attr_kinds, st.binary(max_size=12))


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.tuples(st.lists(_attrs, max_size=8), st.sampled_from([FAMILY_ID, 2, 0x12]),
                          st.integers(0, 3)), min_size=1, max_size=4),
       st.integers(0, 600))
def test_random_attribute_soup_never_raises(msgs, cut: int) -> None:
    data = b"".join(nlmsg(genl(cmd) + b"".join(attrs), mtype=t) for attrs, t, cmd in msgs)
    res = one(data[:cut] if cut < len(data) else data)
    for o in res.observations:
        assert o.kind == "quota.warning" and o.details["warning"]["code"] in EXPECTED


@settings(max_examples=1000, deadline=None)
@given(st.integers(0, 2), st.integers(0, (1 << 64) - 1), st.integers(0, 10), st.integers(0, 4095),
       st.integers(0, (1 << 20) - 1), st.none() | st.integers(0, (1 << 64) - 1), st.booleans())
def test_any_valid_warning_round_trips(qtype, excess, code, major, minor, caused, pad) -> None:
    [obs] = one(warning_msg(qtype, excess, code, major, minor, caused, pad=pad)).observations
    assert obs.device == Device(major, minor, None)
    assert (obs.details["quota_type"], obs.details["id"], obs.details["caused_id"]) == (QTYPES[qtype], excess, caused)
    assert obs.details["warning"]["name"] == EXPECTED[code][0]

"""Every rejection names the request and the reason, and closes the fds of the bad message."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

import pytest

from protocol import (
    BACKEND_SPECS,
    FRONTEND_SPECS,
    BackendRequest,
    FrontendRequest,
    Message,
    ProtocolError,
    build_message,
    encode_reply,
    encode_request,
    expects_reply,
    needs_ack,
    parse_message,
    spec_for,
)
from tests.protocol.captures import fd_is_open, no_fd_leak

HDR = struct.Struct("<III")
FR = FrontendRequest
BR = BackendRequest
REGION = {"guest_phys_addr": 0, "memory_size": 1 << 20, "userspace_addr": 1 << 40, "mmap_offset": 0}


def wire(request: int, flags: int, payload: bytes = b"") -> bytes:
    return HDR.pack(request, flags, len(payload)) + payload


def u32s(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}I", *values)


def u64s(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}Q", *values)


def eventfds(n: int) -> list[int]:
    return [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(n)]


def rejects(data: bytes, nfds: int, match: str, sender: str = "frontend") -> ProtocolError:
    """parse_message must raise, and must close the real fds it was given."""
    fds = eventfds(nfds)
    with pytest.raises(ProtocolError, match=match) as info:
        parse_message(data, sender=sender, fds=fds)  # type: ignore[arg-type]
    assert not any(fd_is_open(fd) for fd in fds), "fds of a rejected message left open"
    return info.value


def accepts(data: bytes, nfds: int, sender: str = "frontend") -> Message:
    fds = eventfds(nfds)
    msg = parse_message(data, sender=sender, fds=fds)  # type: ignore[arg-type]
    assert msg.fds == fds and all(fd_is_open(fd) for fd in fds)
    for fd in fds:
        os.close(fd)
    return msg


BAD: list[tuple[str, bytes, int, str]] = [
    ("unknown frontend code", wire(46, 1), 0, r"request 46: unknown front-end request code"),
    ("code zero", wire(0, 1), 1, "unknown front-end request code 0"),
    ("version 0", wire(1, 0), 0, r"GET_FEATURES: bad version 0"),
    ("version 2", wire(1, 2), 0, "bad version 2"),
    ("version 3", wire(1, 3), 0, "bad version 3"),
    ("reserved flag bit 4", wire(1, 0x11), 0, "reserved flag bits"),
    ("reserved flag bit 31", wire(3, 0x80000001), 1, "SET_OWNER: reserved flag bits"),
    ("reply asking for reply", wire(6, 0xD), 0, "must not ask for a reply"),
    ("u64 too short", wire(2, 1, bytes(4)), 0, r"SET_FEATURES: payload size 4, expected 8"),
    ("u64 too long", wire(2, 1, bytes(9)), 0, "payload size 9, expected 8"),
    ("empty payload expected", wire(3, 1, bytes(8)), 0, r"SET_OWNER: payload size 8, expected 0"),
    ("vring addr short", wire(9, 1, bytes(32)), 0, "SET_VRING_ADDR: payload size 32"),
    ("too big", HDR.pack(25, 1, 4097) + bytes(4097), 0, "size 4097 > 4096"),
    ("truncated header", b"\x01\x00\x00", 0, "shorter than the 12-byte header"),
    ("truncated payload", HDR.pack(2, 1, 8) + bytes(4), 0, "header says 12 \\+ 8"),
    ("trailing bytes", wire(2, 1, bytes(8)) + b"x", 0, "header says 12 \\+ 8"),
    ("nregions 9", wire(5, 1, u32s(9, 0) + bytes(9 * 32)), 9, r"SET_MEM_TABLE: nregions 9 > 8"),
    ("nregions vs fds", wire(5, 1, u32s(2, 0) + bytes(64)), 1, r"nregions 2 != 1 fds"),
    ("table size", wire(5, 1, u32s(1, 0) + bytes(40)), 1, "does not match 1 regions"),
    ("table header short", wire(5, 1, bytes(4)), 0, "shorter than a memory table"),
    ("fd on GET_FEATURES", wire(1, 1), 1, r"GET_FEATURES: 1 fds on a message that takes none"),
    ("fds on SET_VRING_NUM", wire(8, 1, u32s(0, 256)), 2, "takes none"),
    ("kick without fd", wire(12, 1, u64s(0)), 0, r"SET_VRING_KICK: 0 fds, expected 1 fd unless"),
    ("call NOFD with fd", wire(13, 1, u64s(0x100)), 1, "SET_VRING_CALL: 1 fds"),
    ("err two fds", wire(14, 1, u64s(3)), 2, "SET_VRING_ERR: 2 fds"),
    ("vring file reserved", wire(12, 1, u64s(0x200)), 1, "reserved bits set in vring index"),
    ("vring state index", wire(8, 1, u32s(256, 128)), 0, r"SET_VRING_NUM: vring index 256 > 255"),
    ("vring addr index", wire(9, 1, u32s(1000, 0) + bytes(32)), 0, "vring index 1000 > 255"),
    ("enable index", wire(18, 1, u32s(0xFFFFFFFF, 1)), 0, "SET_VRING_ENABLE: vring index"),
    ("add mem reg no fd", wire(37, 1, bytes(40)), 0, r"ADD_MEM_REG: 0 fds, expected exactly 1"),
    ("rem mem reg two fds", wire(38, 1, bytes(40)), 2, "REM_MEM_REG: 2 fds, expected 0 or 1"),
    ("backend req fd missing", wire(21, 9), 0, "SET_BACKEND_REQ_FD: 0 fds"),
    (
        "config too big",
        wire(25, 1, u32s(0, 257, 0) + bytes(257)),
        0,
        r"SET_CONFIG: config size 257",
    ),
    ("config size mismatch", wire(24, 1, u32s(0, 57, 0) + bytes(56)), 0, "does not match config"),
    ("config short", wire(24, 1, bytes(8)), 0, "shorter than a config"),
    ("inflight short", wire(32, 1, bytes(20)), 1, "SET_INFLIGHT_FD: payload size 20, expected 24"),
    ("nine fds", wire(5, 1, u32s(8, 0) + bytes(8 * 32)), 9, "9 fds, more than the 8"),
]


@pytest.mark.parametrize(("data", "nfds", "match"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_rejected_with_reason_and_fds_closed(data: bytes, nfds: int, match: str) -> None:
    with no_fd_leak():
        rejects(data, nfds, match)


def test_error_carries_request_and_reason() -> None:
    err = rejects(wire(8, 1, u32s(300, 0)), 0, "vring index")
    assert err.request is FR.SET_VRING_NUM
    assert err.reason == "vring index 300 > 255"
    err = rejects(wire(99, 1), 0, "unknown")
    assert err.request == 99
    err = rejects(b"", 0, "header")
    assert err.request is None


def test_backend_requests_have_their_own_numbering() -> None:
    assert accepts(wire(4, 1, u32s(1, 0)), 0, sender="backend").request is BR.BACKEND_VRING_CALL
    rejects(wire(11, 1), 0, "unknown back-end request code 11", sender="backend")
    map_msg = wire(9, 1, bytes(40))
    assert accepts(map_msg, 1, sender="backend").request is BR.SHMEM_MAP
    rejects(map_msg, 0, "BACKEND_SHMEM_MAP: 0 fds", sender="backend")
    notifier = wire(3, 1, u64s(0x100, 4096, 0))
    assert accepts(notifier, 0, sender="backend").payload.vring.nofd
    rejects(notifier, 1, "BACKEND_VRING_HOST_NOTIFIER_MSG: 1 fds", sender="backend")


def test_fd_rules_that_depend_on_the_payload() -> None:
    assert accepts(wire(12, 1, u64s(0x105)), 0).payload == {"index": 5, "nofd": True}
    assert accepts(wire(13, 1, u64s(7)), 1).payload == {"index": 7, "nofd": False}
    # REM_MEM_REG: no fd per spec, but QEMU 7.2 sends one; both are accepted
    assert accepts(wire(38, 1, bytes(40)), 0).request is FR.REM_MEM_REG
    assert accepts(wire(38, 1, bytes(40)), 1).request is FR.REM_MEM_REG
    assert accepts(wire(5, 9, u32s(0, 0)), 0).payload.regions == []
    assert accepts(wire(6, 9, u64s(4096, 0)), 1).payload == {"mmap_size": 4096, "mmap_offset": 0}


REPLY = 0x5


def test_replies_take_the_shape_of_the_answered_request() -> None:
    def reply(req: FR, payload: bytes, nfds: int = 0) -> Message:
        return accepts(wire(req, REPLY, payload), nfds, sender="backend")

    assert reply(FR.GET_FEATURES, u64s(1 << 32)).payload == 1 << 32
    assert reply(FR.GET_VRING_BASE, u32s(0, 42)).payload == {"index": 0, "num": 42}
    cfg = reply(FR.GET_CONFIG, u32s(0, 3, 0) + b"abc").payload
    assert (cfg.size, cfg.payload) == (3, b"abc")
    assert reply(FR.GET_CONFIG, b"").payload is None  # the back-end's error reply
    inflight = reply(FR.GET_INFLIGHT_FD, u64s(8192, 0) + struct.pack("<HHI", 1, 128, 0), 1)
    assert (inflight.payload.num_queues, inflight.payload.queue_size) == (1, 128)
    assert reply(FR.SET_MEM_TABLE, u64s(0)).payload == 0  # REPLY_ACK to a NEED_REPLY request
    assert reply(FR.SET_VRING_NUM, u64s(1)).payload == 1
    assert reply(FR.ADD_MEM_REG, bytes(40)).payload.region.memory_size == 0  # postcopy answer
    assert reply(FR.SET_DEVICE_STATE_FD, u64s(0), 1).payload == 0
    assert reply(FR.SET_DEVICE_STATE_FD, u64s(0x100), 0).payload == 0x100
    # the front-end answers back-end requests
    lookup = accepts(wire(8, REPLY, u64s(0)), 1, sender="frontend")
    assert lookup.request is BR.BACKEND_SHARED_OBJECT_LOOKUP and lookup.is_reply


def test_bad_replies() -> None:
    def bad(req: FR, payload: bytes, nfds: int, match: str) -> None:
        rejects(wire(req, REPLY, payload), nfds, match, sender="backend")

    bad(FR.GET_VRING_BASE, u64s(0) + bytes(1), 0, "GET_VRING_BASE: reply size 9 fits no reply")
    bad(FR.GET_INFLIGHT_FD, bytes(24), 1, "1 fds on a message that takes none")  # mmap_size 0
    bad(FR.GET_INFLIGHT_FD, u64s(1, 0, 0), 0, "GET_INFLIGHT_FD: 0 fds")
    bad(FR.SET_DEVICE_STATE_FD, u64s(0), 0, "expected 1 fd unless bit 8")
    bad(FR.SET_MEM_TABLE, u64s(0), 1, "takes none")
    bad(FR.GET_FEATURES, b"", 0, "GET_FEATURES: reply size 0")


def test_encode_request_checks_fd_count_and_values() -> None:
    table = {"regions": [REGION, REGION]}
    data = encode_request(FR.SET_MEM_TABLE, table, need_reply=True, fds_count=2)
    assert HDR.unpack_from(data) == (5, 0x9, 8 + 2 * 32)
    with pytest.raises(ProtocolError, match=r"SET_MEM_TABLE: nregions 2 != 1 fds"):
        encode_request(FR.SET_MEM_TABLE, table, fds_count=1)
    with pytest.raises(ProtocolError, match="nregions 9 > 8"):
        encode_request(FR.SET_MEM_TABLE, {"regions": [REGION] * 9}, fds_count=9)
    with pytest.raises(ProtocolError, match="vring index 256 > 255"):
        encode_request(FR.SET_VRING_NUM, {"index": 256, "num": 1})
    with pytest.raises(ProtocolError, match="SET_VRING_KICK: cannot encode"):
        encode_request(FR.SET_VRING_KICK, {"index": 300, "nofd": False}, fds_count=1)
    with pytest.raises(ProtocolError, match="GET_FEATURES: takes no payload"):
        encode_request(FR.GET_FEATURES, 5)
    with pytest.raises(ProtocolError, match="SET_VRING_ADDR: expects a vring addr"):
        encode_request(FR.SET_VRING_ADDR, 5)
    with pytest.raises(ProtocolError, match="SET_CONFIG: config size 300"):
        encode_request(FR.SET_CONFIG, {"offset": 0, "payload": bytes(300)})
    kick = encode_request(FR.SET_VRING_KICK, {"index": 3, "nofd": True})
    assert kick == wire(12, 1, u64s(0x103))
    assert encode_request(FR.SET_VRING_CALL, 2, fds_count=1) == wire(13, 1, u64s(2))


def test_encode_reply_shapes() -> None:
    assert encode_reply(FR.SET_MEM_TABLE, 0) == wire(5, REPLY, u64s(0))
    assert encode_reply(FR.GET_FEATURES, 7) == wire(1, REPLY, u64s(7))
    assert encode_reply(FR.GET_VRING_BASE, {"index": 1, "num": 9}) == wire(11, REPLY, u32s(1, 9))
    cfg = encode_reply(FR.GET_CONFIG, {"offset": 0, "flags": 0, "payload": b"xy"})
    assert cfg == wire(24, REPLY, u32s(0, 2, 0) + b"xy")
    assert encode_reply(FR.GET_CONFIG, None) == wire(24, REPLY)
    with pytest.raises(ProtocolError, match="GET_VRING_BASE: reply payload int is not"):
        encode_reply(FR.GET_VRING_BASE, 3)


def test_build_message_round_trips_a_python_message() -> None:
    msg = Message(FR.SET_VRING_ADDR, 1, {"index": 0, "flags": 1, "desc_user_addr": 1,
                                          "used_user_addr": 2, "avail_user_addr": 3,
                                          "log_guest_addr": 4})  # fmt: skip
    again = parse_message(build_message(msg))
    assert again.payload == msg.payload and again.flags == 1 and again.fds == []


def test_table_covers_every_request() -> None:
    assert set(FRONTEND_SPECS) == set(FR) and len(FR) == 45
    assert set(BACKEND_SPECS) == set(BR) and len(BR) == 10
    assert spec_for(BR.VRING_CALL) is BACKEND_SPECS[4]
    assert FR.SET_SLAVE_REQ_FD is FR.SET_BACKEND_REQ_FD


REQUIRED = {FR.GET_FEATURES, FR.GET_PROTOCOL_FEATURES, FR.GET_VRING_BASE,
            FR.GET_VRING_BASE_SKIP_DRAIN, FR.GET_QUEUE_NUM, FR.GET_CONFIG}  # fmt: skip


@pytest.mark.parametrize("req", sorted(REQUIRED))
def test_requests_that_always_get_a_reply(req: FR) -> None:
    assert expects_reply(Message(req, 1)) and not needs_ack(Message(req, 9))


def test_need_reply_asks_for_an_ack_only_without_an_explicit_reply() -> None:
    assert not expects_reply(Message(FR.SET_MEM_TABLE, 1))
    assert expects_reply(Message(FR.SET_MEM_TABLE, 9)) and needs_ack(Message(FR.SET_MEM_TABLE, 9))
    log = Message(FR.SET_LOG_BASE, 1)
    assert not expects_reply(log) and expects_reply(log, protocol_features=1 << 1)
    assert not expects_reply(Message(FR.GET_FEATURES, 5))  # a reply is not answered


MAKERS: list[Callable[[], bytes]] = [
    lambda: encode_request(BR.BACKEND_CONFIG_CHANGE_MSG, need_reply=True),
    lambda: encode_request(BR.BACKEND_SHMEM_UNMAP, {"shmid": 1, "fd_offset": 0,
                                                    "shm_offset": 4096, "len": 4096, "flags": 1}),
]  # fmt: skip


@pytest.mark.parametrize("make", MAKERS)
def test_backend_request_encoding_parses_back(make: Callable[[], bytes]) -> None:
    data = make()
    assert build_message(parse_message(data, sender="backend")) == data


def test_fd_count_mismatch_is_a_protocol_error_and_closes_the_fds() -> None:
    with no_fd_leak():
        fds = eventfds(1)
        with pytest.raises(ProtocolError, match=r"SET_VRING_KICK: nfds=2 but 1 fds") as info:
            parse_message(wire(12, 1, u64s(0)), nfds=2, fds=fds)
        assert info.value.request is FR.SET_VRING_KICK
        assert not fd_is_open(fds[0])
        fds = eventfds(2)
        with pytest.raises(ProtocolError, match="nfds=1 but 2 fds") as info:
            parse_message(b"\x01", nfds=1, fds=fds)  # not even a header: no request to name
        assert info.value.request is None
        assert not any(fd_is_open(fd) for fd in fds)


def test_bad_arguments_to_parse_message_close_the_fds() -> None:
    with no_fd_leak():
        fds = eventfds(1)
        with pytest.raises(TypeError):
            parse_message("not bytes", fds=fds)  # type: ignore[arg-type]
        assert not fd_is_open(fds[0])
        fds = eventfds(1)
        with pytest.raises(ValueError, match="sender"):
            parse_message(wire(12, 1, u64s(0)), sender="qemu", fds=fds)  # type: ignore[arg-type]
        assert not fd_is_open(fds[0])


def test_shmem_config_nregions_is_at_most_256() -> None:
    """u32 nregions, u32 padding, u64 memory_sizes[256] (VIRTIO_MAX_SHMEM_REGIONS)."""
    reply = 0x5  # version 1 + REPLY
    sizes = bytes(256 * 8)
    ok = accepts(wire(44, reply, u32s(256, 0) + sizes), 0, sender="backend")
    assert ok.request is FR.GET_SHMEM_CONFIG and ok.payload.nregions == 256
    err = rejects(wire(44, reply, u32s(257, 0) + sizes), 0, "nregions 257 > 256", "backend")
    assert err.request is FR.GET_SHMEM_CONFIG
    assert err.reason == "shmem config nregions 257 > 256"
    with pytest.raises(ProtocolError, match="GET_SHMEM_CONFIG: shmem config nregions 300 > 256"):
        encode_reply(FR.GET_SHMEM_CONFIG, {"nregions": 300, "memory_sizes": [0] * 256})

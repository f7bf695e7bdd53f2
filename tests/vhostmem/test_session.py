"""Every vhost-user request QEMU 7.2 sends, against a real in-process vhostmem server.

The fake guest (vhostmem.frontend) talks over a real Unix socket with real memfds and eventfds;
REPLY_ACK answers, failure acks, disconnect-on-failure, and replay of the QEMU 7.2 captures.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from protocol import (
    BlkFeature,
    FrontendRequest,
    ProtocolFeature,
    VirtioFeature,
    encode_request,
)
from tests.vhostmem.serverenv import ServerThread, fd_snapshot, running_server
from vhostmem.frontend import GuestRam, SplitRing, VhostUserBlk, VhostUserClient, VhostUserError
from vhostmem.server import Endpoint, new_event_loop

CAPTURES = Path(__file__).resolve().parents[3] / "shared" / "captures"
SECTOR = 512
RAM = 8 << 20
PAGE = 4096


def bits(*numbers: int) -> int:
    out = 0
    for n in numbers:
        out |= 1 << n
    return out


EXPECTED_FEATURES = bits(
    VirtioFeature.VERSION_1, VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES,
    VirtioFeature.INDIRECT_DESC, VirtioFeature.EVENT_IDX, VirtioFeature.RING_PACKED,
    BlkFeature.SIZE_MAX, BlkFeature.SEG_MAX, BlkFeature.BLK_SIZE, BlkFeature.FLUSH,
    BlkFeature.CONFIG_WCE, BlkFeature.MQ, BlkFeature.DISCARD, BlkFeature.WRITE_ZEROES,
    VirtioFeature.LOG_ALL,
)
EXPECTED_PROTOCOL = bits(
    ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG,
    ProtocolFeature.CONFIGURE_MEM_SLOTS, ProtocolFeature.RESET_DEVICE, ProtocolFeature.STATUS,
    ProtocolFeature.BACKEND_REQ, ProtocolFeature.INFLIGHT_SHMFD, ProtocolFeature.LOG_SHMFD,
)
ACK_PROTOCOL = bits(ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG, ProtocolFeature.MQ,
                    ProtocolFeature.CONFIGURE_MEM_SLOTS, ProtocolFeature.RESET_DEVICE,
                    ProtocolFeature.STATUS, ProtocolFeature.BACKEND_REQ)


@pytest.fixture
def srv() -> Iterator[ServerThread]:
    with running_server(new_event_loop) as s:
        yield s


@pytest.fixture
def ep(srv: ServerThread) -> Endpoint:
    return srv.add_blk()


def negotiated(ep: Endpoint, protocol: int = ACK_PROTOCOL) -> VhostUserClient:
    """A client through SET_OWNER, features and protocol features (REPLY_ACK on by default)."""
    c = VhostUserClient.connect(ep.config.path)
    c.set_owner()
    features = c.get_features()
    c.set_protocol_features(c.get_protocol_features() & protocol)
    c.set_features(features & ~bits(BlkFeature.CONFIG_WCE))
    return c


def ack(c: VhostUserClient, request: FrontendRequest, payload: Any = None,
        fds: list[int] | tuple[int, ...] = ()) -> int:
    """Send with NEED_REPLY; return the REPLY_ACK status."""
    c.send(request, payload, fds, need_reply=True)
    reply = c.recv()
    assert reply.request == request and reply.is_reply
    return int(reply.payload)


def do_io(ep: Endpoint, pattern: bytes = b"q") -> None:
    """A whole new frontend writes and reads back a block."""
    with VhostUserBlk.open(ep.config.path, ram_size=RAM) as dev:
        q = dev.start_queue(0, size=16)
        q.write(3, pattern * SECTOR)
        assert q.read(3, SECTOR) == pattern * SECTOR


def assert_disconnected(c: VhostUserClient) -> None:
    with pytest.raises(VhostUserError, match="closed"):
        c.recv(timeout=5)


# ---------------------------------------------------------------- negotiation


def test_offered_feature_sets_are_exact(ep: Endpoint) -> None:
    with VhostUserClient.connect(ep.config.path) as c:
        assert c.get_features() == EXPECTED_FEATURES
        assert c.get_protocol_features() == EXPECTED_PROTOCOL
        c.set_protocol_features(ACK_PROTOCOL)
        assert c.get_queue_num() == 1
        assert c.get_max_mem_slots() == 509


def test_queue_num_follows_the_device(srv: ServerThread) -> None:
    ep = srv.add_blk(num_queues=3)
    with negotiated(ep) as c:
        assert c.get_queue_num() == 3


def test_status_round_trip_and_reset_device_clears_it(ep: Endpoint) -> None:
    with negotiated(ep) as c:
        assert c.get_status() == 0
        c.set_status(0x0F)
        assert c.get_status() == 0x0F
        c.reset_device()
        assert c.get_status() == 0


def test_config_read_and_writeback_write(ep: Endpoint) -> None:
    with VhostUserBlk.open(ep.config.path, ram_size=RAM) as dev:
        cfg = dev.config()
        assert cfg["capacity"] == (4 << 20) // SECTOR
        dev.client.set_config(32, b"\x00")
        assert dev.client.get_config(32, 1) == b"\x00"
        dev.client.set_config(32, b"\x01")
        assert dev.client.get_config(32, 1) == b"\x01"


def test_get_config_failure_is_an_empty_reply_and_the_connection_lives(ep: Endpoint) -> None:
    with negotiated(ep) as c:
        c.send(FrontendRequest.GET_CONFIG,
               {"offset": 250, "size": 200, "flags": 0, "payload": bytes(200)})
        reply = c.recv()
        assert reply.request == FrontendRequest.GET_CONFIG and reply.is_reply
        assert reply.payload is None or len(reply.payload.payload) == 0
        assert c.get_features() == EXPECTED_FEATURES


# ------------------------------------------------------------------ REPLY_ACK


def test_every_request_acks_zero_on_success(ep: Endpoint) -> None:
    """NEED_REPLY on each non-GET request QEMU sends: REPLY_ACK 0, then real I/O works."""
    ram = GuestRam()
    ram.add_region(0, RAM)
    extra = GuestRam()
    extra.add_region(RAM, 1 << 20)
    ring = SplitRing(ram, 16)
    kick, call, err = (os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3))
    a, b = socket.socketpair()
    region, extra_region = ram.regions[0], extra.regions[0]
    host = ram.host_address
    try:
        c = VhostUserClient.connect(ep.config.path)
        features = c.get_features()
        c.set_protocol_features(ACK_PROTOCOL)
        steps: list[tuple[FrontendRequest, Any, list[int]]] = [
            (FrontendRequest.SET_OWNER, None, []),
            (FrontendRequest.SET_BACKEND_REQ_FD, None, [b.fileno()]),
            (FrontendRequest.SET_FEATURES, features, []),
            (FrontendRequest.SET_MEM_TABLE, {"regions": [region.as_dict()]}, [region.fd]),
            (FrontendRequest.ADD_MEM_REG, {"region": extra_region.as_dict()}, [extra_region.fd]),
            (FrontendRequest.REM_MEM_REG, {"region": extra_region.as_dict()}, [extra_region.fd]),
            (FrontendRequest.SET_VRING_NUM, {"index": 0, "num": 16}, []),
            (FrontendRequest.SET_VRING_BASE, {"index": 0, "num": 0}, []),
            (FrontendRequest.SET_VRING_ADDR, {
                "index": 0, "flags": 0, "desc_user_addr": host(ring.addr.desc),
                "used_user_addr": host(ring.addr.used), "avail_user_addr": host(ring.addr.avail),
                "log_guest_addr": 0}, []),
            (FrontendRequest.SET_VRING_CALL, {"index": 0, "nofd": False}, [call]),
            (FrontendRequest.SET_VRING_ERR, {"index": 0, "nofd": False}, [err]),
            (FrontendRequest.SET_VRING_KICK, {"index": 0, "nofd": False}, [kick]),
            (FrontendRequest.SET_VRING_ENABLE, {"index": 0, "num": 1}, []),
            (FrontendRequest.SET_CONFIG, {"offset": 32, "flags": 0, "payload": b"\x01"}, []),
            (FrontendRequest.SET_STATUS, 0x0F, []),
            (FrontendRequest.SET_VRING_ENABLE, {"index": 0, "num": 0}, []),
            (FrontendRequest.RESET_DEVICE, None, []),
            (FrontendRequest.RESET_OWNER, None, []),
        ]
        for request, payload, fds in steps:
            assert ack(c, request, payload, fds) == 0, request.name
        assert c.get_vring_base(0) == 0
        c.close()
    finally:
        for fd in (kick, call, err):
            os.close(fd)
        a.close()
        b.close()
        ring.free()
        ram.close()
        extra.close()
    do_io(ep)


@pytest.mark.parametrize("request_", [
    FrontendRequest.GET_FEATURES, FrontendRequest.GET_PROTOCOL_FEATURES,
    FrontendRequest.GET_QUEUE_NUM, FrontendRequest.GET_MAX_MEM_SLOTS, FrontendRequest.GET_STATUS,
])
def test_need_reply_on_a_get_request_gives_exactly_its_reply(
    ep: Endpoint, request_: FrontendRequest
) -> None:
    with negotiated(ep) as c:
        c.send(request_, need_reply=True)
        reply = c.recv()
        assert reply.request == request_ and reply.is_reply
        c.send(FrontendRequest.GET_FEATURES)
        follow = c.recv()  # not a stray REPLY_ACK for the GET request
        assert follow.request == FrontendRequest.GET_FEATURES
        assert follow.payload == EXPECTED_FEATURES


def test_need_reply_without_reply_ack_negotiated_is_answered(ep: Endpoint) -> None:
    with negotiated(ep, protocol=bits(ProtocolFeature.MQ)) as c:
        assert ack(c, FrontendRequest.SET_VRING_NUM, {"index": 0, "num": 16}) == 0
        assert ack(c, FrontendRequest.SET_VRING_NUM, {"index": 0, "num": 3}) != 0
        c.send(FrontendRequest.GET_QUEUE_NUM)
        reply = c.recv()
        assert (reply.request, reply.payload) == (FrontendRequest.GET_QUEUE_NUM, 1)


def test_qemu_reconnect_without_negotiation_gets_its_acks(ep: Endpoint) -> None:
    """QEMU 7.2's destination reconnecting to a restarted backend during a migration: no
    GET/SET_PROTOCOL_FEATURES, no SET_OWNER, then ADD_MEM_REG with NEED_REPLY, QEMU's main
    loop blocked on the answer (captured with qemu/migrate.py's relay). The old code sent
    none: the destination hung."""
    ram = GuestRam()
    ram.add_region(0, RAM)
    region = ram.regions[0]
    with VhostUserClient.connect(ep.config.path) as c:
        c.send(FrontendRequest.SET_FEATURES, bits(VirtioFeature.VERSION_1))
        c.send(FrontendRequest.GET_STATUS)
        assert c.recv(timeout=5).request == FrontendRequest.GET_STATUS
        assert ack(c, FrontendRequest.ADD_MEM_REG, {"padding": 0, "region": region.as_dict()},
                   [region.fd]) == 0


def _ring_addr(ram: GuestRam, ring: SplitRing, desc: int | None = None) -> dict[str, int]:
    host = ram.host_address
    return {"index": 0, "flags": 0,
            "desc_user_addr": host(ring.addr.desc) if desc is None else desc,
            "used_user_addr": host(ring.addr.used), "avail_user_addr": host(ring.addr.avail),
            "log_guest_addr": 0}


BAD_REQUESTS: dict[str, Any] = {
    "unoffered feature": (FrontendRequest.SET_FEATURES, bits(VirtioFeature.NOTIFY_ON_EMPTY)),
    "unoffered protocol feature": (FrontendRequest.SET_PROTOCOL_FEATURES,
                                   bits(ProtocolFeature.REPLY_ACK, ProtocolFeature.PAGEFAULT)),
    "ring size not a power of two": (FrontendRequest.SET_VRING_NUM, {"index": 0, "num": 3}),
    "ring size too big": (FrontendRequest.SET_VRING_NUM, {"index": 0, "num": 65536}),
    "ring index out of range": (FrontendRequest.SET_VRING_NUM, {"index": 5, "num": 16}),
    "ring address outside memory": "addr",
    "kick before addresses": "kick",
    "enable state 2": (FrontendRequest.SET_VRING_ENABLE, {"index": 0, "num": 2}),
    "config write outside writeback": (FrontendRequest.SET_CONFIG,
                                       {"offset": 0, "flags": 0, "payload": b"\x01\x02"}),
    "overlapping region": "overlap",
    "removing an unknown region": "rem",
    "misaligned table region": "table",
    "unimplemented request": (FrontendRequest.SET_VRING_ENDIAN, {"index": 0, "num": 0}),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_failures_ack_nonzero_and_the_connection_stays_usable(ep: Endpoint, case: str) -> None:
    before = fd_snapshot()
    ram = GuestRam()
    ram.add_region(0, RAM)
    ring = SplitRing(ram, 16)
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        with negotiated(ep) as c:
            region = ram.regions[0]
            c.set_mem_table([region.as_dict()], [region.fd])
            spec = BAD_REQUESTS[case]
            fds: list[int] = []
            if spec == "addr":
                c.set_vring_num(0, 16)
                spec = (FrontendRequest.SET_VRING_ADDR, _ring_addr(ram, ring, desc=1 << 40))
            elif spec == "kick":
                spec = (FrontendRequest.SET_VRING_KICK, {"index": 0, "nofd": False})
                fds = [kick]
            elif spec == "overlap":
                spec = (FrontendRequest.ADD_MEM_REG, {"region": region.as_dict()})
                fds = [region.fd]
            elif spec == "rem":
                spec = (FrontendRequest.REM_MEM_REG, {"region": {
                    "guest_phys_addr": 1 << 30, "memory_size": PAGE,
                    "userspace_addr": 1 << 40, "mmap_offset": 0}})
            elif spec == "table":
                bad = dict(region.as_dict(), guest_phys_addr=PAGE // 2)
                spec = (FrontendRequest.SET_MEM_TABLE, {"regions": [bad]})
                fds = [region.fd]
            status = ack(c, *spec, fds)
            assert status != 0
            # Still usable: a full start on the same connection does I/O.
            assert c.get_features() == EXPECTED_FEATURES
            dev = VhostUserBlk(c, ram)
            dev.client.set_mem_table([region.as_dict()], [region.fd])
            q = dev.start_queue(0, size=16)
            q.write(1, b"k" * SECTOR)
            assert q.read(1, SECTOR) == b"k" * SECTOR
            for st in dev.queues.values():
                for e in (st.kick, st.call, st.err):
                    e.close()
        srv_conn_gone(ep)
    finally:
        os.close(kick)
        ring.free()
        ram.close()
    assert fd_snapshot() == before


def srv_conn_gone(ep: Endpoint, timeout: float = 5.0) -> None:
    import time
    deadline = time.monotonic() + timeout
    while ep.connection is not None:
        assert time.monotonic() < deadline, "server kept the connection"
        time.sleep(0.01)


@pytest.mark.parametrize("case", ["unoffered feature", "ring size not a power of two",
                                  "unimplemented request", "bad GET_VRING_BASE index"])
def test_failure_without_reply_ack_disconnects_and_the_next_frontend_works(
    ep: Endpoint, case: str
) -> None:
    c = negotiated(ep, protocol=0)
    if case == "bad GET_VRING_BASE index":
        c.send(FrontendRequest.GET_VRING_BASE, {"index": 9, "num": 0})
    else:
        request, payload = BAD_REQUESTS[case]
        c.send(request, payload)
    assert_disconnected(c)
    c.close()
    srv_conn_gone(ep)
    do_io(ep)


def test_malformed_message_disconnects(ep: Endpoint) -> None:
    c = VhostUserClient.connect(ep.config.path)
    c.send_raw(encode_request(FrontendRequest.GET_FEATURES)[:4] + b"\x07\x00\x00\x00" + bytes(4))
    assert_disconnected(c)
    c.close()
    do_io(ep)


def test_fds_of_messages_after_a_fatal_one_are_closed(ep: Endpoint) -> None:
    """A failing message followed, in one recv, by more messages: nothing leaks."""
    before = fd_snapshot()
    c = negotiated(ep, protocol=0)
    bad = encode_request(FrontendRequest.SET_VRING_NUM, {"index": 0, "num": 3})
    call = os.eventfd(0)
    good = encode_request(FrontendRequest.SET_VRING_CALL, {"index": 0, "nofd": False},
                          fds_count=1)
    # fds belong to the last message starting in the chunk: the second one.
    c.send_raw(bad + good, [call])
    os.close(call)
    assert_disconnected(c)
    c.close()
    srv_conn_gone(ep)
    assert fd_snapshot() == before


# ------------------------------------------------------------------ captures


def capture_messages(name: str) -> list[dict[str, Any]]:
    with open(CAPTURES / name) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if r.get("channel") == "main" and "request" in r]


def fake_fds(record: dict[str, Any], keep: list[Any]) -> list[int]:
    """Real fds in place of the recorded ones: memfds of the recorded size, eventfds, sockets."""
    fds = []
    for fd in record["fds"]:
        target = fd["target"]
        if target.startswith("/memfd:"):
            m = os.memfd_create("capture-ram")
            os.ftruncate(m, fd["st_size"])
            fds.append(m)
        elif "eventfd" in target:
            fds.append(os.eventfd(0))
        elif target.startswith("socket:"):
            a, b = socket.socketpair()
            keep.append(a)
            fds.append(b.detach())
        else:
            raise AssertionError(f"unknown fd kind {target}")
    return fds


def adjusted(record: dict[str, Any], offered: dict[str, int]) -> bytes:
    """The recorded bytes, with feature acks cut down to what vhostmem offered."""
    request = FrontendRequest(record["request"])
    payload = bytes.fromhex(record["payload_hex"])
    header = record["request"].to_bytes(4, "little") + record["flags"].to_bytes(4, "little")
    if request in (FrontendRequest.SET_FEATURES, FrontendRequest.SET_PROTOCOL_FEATURES):
        key = "features" if request == FrontendRequest.SET_FEATURES else "protocol"
        value = int.from_bytes(payload, "little") & offered[key]
        payload = value.to_bytes(8, "little")
    return header + len(payload).to_bytes(4, "little") + payload


@pytest.mark.parametrize("capture", sorted(p.name for p in CAPTURES.glob("*.jsonl")))
def test_capture_replay(srv: ServerThread, capture: str) -> None:
    ep = srv.add_blk()
    records = capture_messages(capture)
    offered: dict[str, int] = {}
    keep: list[Any] = []
    before = fd_snapshot()
    c = VhostUserClient.connect(ep.config.path)
    replies = 0
    try:
        for i, rec in enumerate(records):
            if rec["dir"] != "fe->be":
                continue
            fds = fake_fds(rec, keep)
            c.send_raw(adjusted(rec, offered), fds)
            for fd in fds:
                os.close(fd)
            nxt = records[i + 1] if i + 1 < len(records) else None
            if nxt is None or nxt["dir"] != "be->fe":
                continue
            reply = c.recv()
            replies += 1
            assert reply.is_reply and reply.request == nxt["request"], (rec["name"], reply)
            assert reply.flags == nxt["flags"]
            if nxt["name"] in ("GET_CONFIG",):
                assert len(reply.payload.payload) == len(bytes.fromhex(nxt["payload_hex"])) - 12
            elif nxt["name"] == "GET_VRING_BASE":
                assert reply.payload.index == 0 and reply.payload.num == 0
            elif nxt["name"] == "GET_FEATURES":
                offered["features"] = int(reply.payload)
            elif nxt["name"] == "GET_PROTOCOL_FEATURES":
                offered["protocol"] = int(reply.payload)
            elif nxt["name"] == "GET_QUEUE_NUM":
                assert reply.payload == 1
            elif nxt["name"] == "GET_MAX_MEM_SLOTS":
                assert reply.payload == 509
            else:  # REPLY_ACK
                assert reply.payload == 0, rec["name"]
        expected = sum(1 for r in records if r["dir"] == "be->fe")
        assert replies == expected
        # The connection is still healthy at the end of the replay.
        assert c.get_features() == offered["features"]
    finally:
        c.close()
        for s in keep:
            s.close()
    srv_conn_gone(ep)
    assert srv.call(srv.registry.chunks) == []
    assert fd_snapshot() == before


# 2 and 9: the values of SET_FEATURES and SET_VRING_NUM among frontend requests.
@pytest.mark.parametrize("number", [2, 9])
def test_a_reply_from_the_frontend_disconnects_and_runs_nothing(
        ep: Endpoint, number: int, caplog: pytest.LogCaptureFixture) -> None:
    """A reply-flagged message on the request channel: no frontend handler runs for it (the old
    code set features from it, or died in a handler with a traceback)."""
    with negotiated(ep, protocol=0) as c:
        c.send_raw(struct.pack("<IIIQ", number, 0x5, 8, 1 << 32))
        assert_disconnected(c)
    srv_conn_gone(ep)
    assert "unexpected error" not in caplog.text and "a reply" in caplog.text, caplog.text
    do_io(ep)

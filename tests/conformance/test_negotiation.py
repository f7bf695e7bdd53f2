"""Negotiation, config space, STATUS/RESET_DEVICE and NEED_REPLY, against every peer."""

from __future__ import annotations

import socket
import struct

import pytest

from protocol import BlkFeature, FrontendRequest, ProtocolFeature, VirtioFeature
from tests.conformance.profiles import (
    MIB,
    SECTOR,
    VHOSTMEM_PROTOCOL_MINIMUM,
    image_size,
    initial,
    profile,
)
from vhostmem.frontend.blk import CONFIG_FIELDS
from vhostmem.frontend.client import VhostUserError
from vhostmem.frontend.device import STATUS_RUNNING, SUPPORTED_FEATURES, VhostUserBlk

pytestmark = pytest.mark.qsd

U64_REPLY = struct.Struct("<IIIQ")  # request, flags, size, u64 payload
UNOFFERED_BIT = 40  # no device type defines it
NO_EXTRA_REPLY_WAIT = 0.2  # seconds to wait for a (wrong) second answer


def test_offered_and_acked_features(blk_peer, num_queues: int) -> None:
    peer = blk_peer(num_queues=num_queues)
    prof = profile(peer)
    with VhostUserBlk.open(peer.socket_path) as dev:
        assert dev.offer.features == prof.features
        # The packed layout is acked only when asked for (VhostUserBlk.open(packed=True)).
        packed = 1 << VirtioFeature.RING_PACKED
        assert dev.client.features == prof.features & SUPPORTED_FEATURES & ~packed
        assert dev.offer.protocol_features == prof.protocol_features
        if peer.kind == "vhostmem":
            minimum = VHOSTMEM_PROTOCOL_MINIMUM
            assert dev.offer.protocol_features & minimum == minimum
        assert dev.client.protocol_features & ~prof.protocol_features == 0
        assert dev.offer.queue_num == num_queues
        assert dev.offer.max_mem_slots == prof.max_mem_slots


def test_read_only_export_offers_ro(blk_peer) -> None:
    peer = blk_peer(readonly=True)
    with VhostUserBlk.open(peer.socket_path) as dev:
        assert dev.offer.features == profile(peer).features | 1 << BlkFeature.RO
        assert dev.has_feature(BlkFeature.RO)


def test_config_capacity_blk_size_num_queues(blk_peer, num_queues: int) -> None:
    peer = blk_peer(size=24 * MIB, num_queues=num_queues)
    with VhostUserBlk.open(peer.socket_path) as dev:
        cfg = dev.config()
        assert cfg["capacity"] == image_size(peer) // SECTOR == 24 * MIB // SECTOR
        assert cfg["blk_size"] == SECTOR
        assert cfg["num_queues"] == num_queues
        assert cfg["writeback"] == profile(peer).writeback_at_start
        # Partial reads of config space return the same bytes as the whole.
        assert dev.client.get_config(CONFIG_FIELDS["capacity"][0], 8) == \
            (24 * MIB // SECTOR).to_bytes(8, "little")


def test_writeback_round_trip(blk_peer) -> None:
    peer = blk_peer()
    with VhostUserBlk.open(peer.socket_path) as dev:
        offset = CONFIG_FIELDS["writeback"][0]
        for value in (1, 0, 1):
            dev.client.set_config(offset, bytes([value]))
            assert dev.config()["writeback"] == value
        # I/O still works in either cache mode.
        q = dev.start_queue(0)
        dev.client.set_config(offset, b"\0")
        q.write(0, b"w" * SECTOR)
        assert q.read(0, SECTOR) == b"w" * SECTOR


def test_status_and_reset_device(blk_peer) -> None:
    """vhostmem offers STATUS and RESET_DEVICE; qsd 7.2 offers neither, so a conforming
    frontend never negotiates them (and `set_running` is a no-op)."""
    peer = blk_peer()
    prof = profile(peer)
    with VhostUserBlk.open(peer.socket_path) as dev:
        assert dev.client.has_protocol(ProtocolFeature.STATUS) is prof.has_status
        assert dev.client.has_protocol(ProtocolFeature.RESET_DEVICE) is prof.has_reset_device
        dev.set_running()
        if prof.has_status:
            assert dev.client.get_status() == STATUS_RUNNING
        q = dev.start_queue(0)
        assert q.read(0, SECTOR) == initial(peer, 0, SECTOR)
        if prof.has_reset_device:
            dev.client.reset_device()
            if prof.has_status:
                assert dev.client.get_status() == 0
    # After a reset (or without one) a fresh connection negotiates and serves normally.
    with VhostUserBlk.open(peer.socket_path) as dev:
        assert dev.start_queue(0).read(1, SECTOR) == initial(peer, 1, SECTOR)


def _acked(dev: VhostUserBlk, request: FrontendRequest, payload: object = None,
           fds: list[int] | None = None) -> None:
    reply = dev.client.call(request, payload, fds or [], ack=True)
    assert reply is not None and reply.payload == 0, request.name


def _raw_u64_reply(sock: socket.socket, request: FrontendRequest) -> tuple[int, int]:
    """Read one u64 reply straight off the socket (bypassing the framer, which would reject
    a reply that carries NEED_REPLY); returns (flags, value)."""
    data = b""
    while len(data) < U64_REPLY.size:
        chunk = sock.recv(U64_REPLY.size - len(data))
        assert chunk, f"connection closed before the reply to {request.name}"
        data += chunk
    req, flags, size, value = U64_REPLY.unpack(data)
    assert (req, size) == (request, 8)
    return flags, value


def test_need_reply_on_every_request_that_allows_it(blk_peer) -> None:
    """With REPLY_ACK, every request without its own reply answers NEED_REPLY with an ack 0;
    requests with a reply answer once (no extra ack)."""
    peer = blk_peer()
    prof = profile(peer)
    with VhostUserBlk.open(peer.socket_path) as dev:
        c = dev.client
        assert c.has_protocol(ProtocolFeature.REPLY_ACK)
        _acked(dev, FrontendRequest.SET_OWNER)
        _acked(dev, FrontendRequest.SET_FEATURES, c.features)
        _acked(dev, FrontendRequest.SET_PROTOCOL_FEATURES, c.protocol_features)
        regions = dev.ram.regions
        _acked(dev, FrontendRequest.SET_MEM_TABLE,
               {"nregions": len(regions), "padding": 0, "regions": [r.as_dict() for r in regions]},
               [r.fd for r in regions])
        extra = dev.ram.add_region(512 * MIB, MIB)
        _acked(dev, FrontendRequest.ADD_MEM_REG, {"padding": 0, "region": extra.as_dict()},
               [extra.fd])
        _acked(dev, FrontendRequest.REM_MEM_REG, {"padding": 0, "region": extra.as_dict()})
        # The vring requests (NUM, BASE, ADDR, CALL, ERR, KICK, ENABLE) all go out with
        # NEED_REPLY: the client asks for an ack on each and fails on anything but 0.
        q = dev.start_queue(0)
        assert q.read(0, SECTOR) == initial(peer, 0, SECTOR)
        _acked(dev, FrontendRequest.SET_CONFIG, {"offset": CONFIG_FIELDS["writeback"][0],
                                                 "size": 1, "flags": 0, "payload": b"\1"})
        if prof.has_status:
            _acked(dev, FrontendRequest.SET_STATUS, STATUS_RUNNING)
        for request, value in ((FrontendRequest.GET_FEATURES, prof.features),
                               (FrontendRequest.GET_QUEUE_NUM, 1),
                               (FrontendRequest.GET_MAX_MEM_SLOTS, prof.max_mem_slots)):
            c.send(request, need_reply=True)
            flags, payload = _raw_u64_reply(c.sock, request)
            assert (flags, payload) == (prof.reply_flags(request), value)
            with pytest.raises(TimeoutError):
                c.recv(timeout=NO_EXTRA_REPLY_WAIT)  # exactly one answer, no extra ack
        assert dev.stop_queue(0) == 1
        if prof.has_reset_device:
            _acked(dev, FrontendRequest.RESET_DEVICE)


def test_unoffered_feature_bit(blk_peer) -> None:
    """Acking a feature bit that was never offered: vhostmem refuses it with a failed
    REPLY_ACK and keeps the connection; qsd accepts it (documented difference)."""
    peer = blk_peer()
    with VhostUserBlk.open(peer.socket_path) as dev:
        unoffered = 1 << UNOFFERED_BIT
        assert dev.offer.features & unoffered == 0
        try:
            dev.client.call(FrontendRequest.SET_FEATURES, dev.client.features | unoffered,
                            ack=True)
            refused = False
        except VhostUserError as exc:
            assert "REPLY_ACK" in str(exc)
            refused = True
        assert refused is profile(peer).refuses_unoffered_features
        # Either way the connection still answers.
        assert dev.client.get_features() == profile(peer).features
    assert peer.alive()

"""Every virtio-blk request type and status, every descriptor layout, EVENT_IDX on and off,
byte-for-byte against the image file, read-only exports; against every peer, and the request
cases also on packed rings (`ring_peer`: vhostmem only, qemu-storage-daemon has none)."""

from __future__ import annotations

import fcntl
import os
import random

import pytest

from protocol import FrontendRequest, ProtocolFeature, VirtioFeature
from tests.conformance.profiles import MIB, SECTOR, image, initial, profile
from vhostmem.frontend.blk import (
    INDIRECT,
    MERGED,
    STANDARD,
    BlkStatus,
    BlkType,
    Layout,
    discard_segment,
)
from vhostmem.frontend.client import VhostUserError
from vhostmem.frontend.device import VhostUserBlk
from vhostmem.frontend.packed import RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_ENABLE

pytestmark = pytest.mark.qsd

LAYOUTS = {
    "standard": STANDARD,
    "merged-2": MERGED,
    "data-split-4": Layout(data_chunks=4),
    "header-split": Layout(header_chunks=2, data_chunks=3),
    "merged-split": Layout(data_chunks=5, merge_header=True, merge_status=True),
    "indirect": INDIRECT,
    "indirect-merged": MERGED.with_indirect(),
    "indirect-split-8": Layout(data_chunks=8, header_chunks=2, indirect=True),
}
UNKNOWN_TYPE = 99  # no virtio-blk request type has this number
MALFORMED_WAIT = 0.5  # seconds a peer gets to (not) complete a malformed chain


def _last_queue(dev: VhostUserBlk, num_queues: int):
    """Start every queue and return the last one (queue 1 of a 2-queue export)."""
    return [dev.start_queue(i) for i in range(num_queues)][-1]


@pytest.mark.parametrize("mem", ["table", "slots"])
def test_read_write_byte_for_byte(ring_peer, num_queues: int, mem: str) -> None:
    blk_peer, packed = ring_peer
    peer = blk_peer(num_queues=num_queues)
    rng = random.Random(7)
    with VhostUserBlk.open(peer.socket_path, mem=mem, packed=packed) as dev:
        assert dev.packed is packed
        q = _last_queue(dev, num_queues)
        for _ in range(8):
            sector, length = rng.randrange(0, 30000), SECTOR * rng.randrange(1, 64)
            assert q.read(sector, length) == initial(peer, sector, length)
        data = rng.randbytes(64 * 1024)
        q.write(100, data)
        q.flush()
        assert image(peer, 100 * SECTOR, len(data)) == data
        assert image(peer, 100 * SECTOR + len(data), SECTOR) == initial(peer, 228, SECTOR)
        assert q.read(100, len(data)) == data


def test_flush_and_get_id(ring_peer, num_queues: int) -> None:
    blk_peer, packed = ring_peer
    peer = blk_peer(num_queues=num_queues)
    with VhostUserBlk.open(peer.socket_path, packed=packed) as dev:
        assert dev.packed is packed
        q = _last_queue(dev, num_queues)
        q.flush()
        assert q.get_id() == profile(peer).serial
        # A 20-byte buffer is the whole answer; a shorter one gets a truncated serial.
        status, raw = q.run(BlkType.GET_ID, in_len=8)
        assert status == BlkStatus.OK and raw == profile(peer).serial[:8]


def test_write_zeroes_with_and_without_unmap(ring_peer) -> None:
    blk_peer, packed = ring_peer
    peer = blk_peer()
    with VhostUserBlk.open(peer.socket_path, packed=packed) as dev:
        assert dev.packed is packed
        q = dev.start_queue(0, depth=4, max_data=MIB)
        q.write_zeroes(64, 8)
        assert image(peer, 64 * SECTOR, 8 * SECTOR) == bytes(8 * SECTOR)
        assert image(peer, 72 * SECTOR, SECTOR) == initial(peer, 72, SECTOR)
        assert image(peer, 63 * SECTOR, SECTOR) == initial(peer, 63, SECTOR)
        q.write_zeroes(2048, 2048, unmap=True)
        assert q.read(2048, MIB) == bytes(MIB)
        assert image(peer, 2048 * SECTOR, MIB) == bytes(MIB)
        assert image(peer, 4096 * SECTOR, SECTOR) == initial(peer, 4096, SECTOR)


def test_discard_reads_back_zeroes(ring_peer) -> None:
    """Both peers punch a hole for an aligned discard, so the image reads zeroes."""
    blk_peer, packed = ring_peer
    peer = blk_peer()
    with VhostUserBlk.open(peer.socket_path, packed=packed) as dev:
        assert dev.packed is packed
        q = dev.start_queue(0)
        q.discard(1024, 2048)
        assert image(peer, 1024 * SECTOR, MIB) == bytes(MIB)
        assert image(peer, 3072 * SECTOR, SECTOR) == initial(peer, 3072, SECTOR)
        assert image(peer, 1023 * SECTOR, SECTOR) == initial(peer, 1023, SECTOR)


@pytest.mark.parametrize("type_", [UNKNOWN_TYPE, BlkType.GET_LIFETIME])
def test_unsupported_type_is_unsupp(ring_peer, type_: int) -> None:
    blk_peer, packed = ring_peer
    peer = blk_peer()
    with VhostUserBlk.open(peer.socket_path, packed=packed) as dev:
        assert dev.packed is packed
        q = dev.start_queue(0)
        status, _ = q.run(type_, 0, in_len=SECTOR)
        assert status == BlkStatus.UNSUPP
        assert q.read(0, SECTOR) == initial(peer, 0, SECTOR)  # the queue still works


def test_io_past_the_end_is_ioerr(ring_peer) -> None:
    blk_peer, packed = ring_peer
    peer = blk_peer(size=MIB)
    last = MIB // SECTOR
    with VhostUserBlk.open(peer.socket_path, packed=packed) as dev:
        assert dev.packed is packed
        q = dev.start_queue(0)
        assert q.run(BlkType.IN, last, in_len=SECTOR)[0] == BlkStatus.IOERR
        assert q.run(BlkType.IN, last - 1, in_len=2 * SECTOR)[0] == BlkStatus.IOERR
        assert q.run(BlkType.OUT, last, data=b"x" * SECTOR)[0] == BlkStatus.IOERR
        assert q.run(BlkType.WRITE_ZEROES, data=discard_segment(last, 1))[0] == BlkStatus.IOERR
        assert q.read(last - 1, SECTOR) == initial(peer, last - 1, SECTOR)
        assert os.path.getsize(peer.image_path) == MIB


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_descriptor_layout(ring_peer, name: str) -> None:
    blk_peer, packed = ring_peer
    peer, layout = blk_peer(), LAYOUTS[name]
    with VhostUserBlk.open(peer.socket_path, packed=packed) as dev:
        assert dev.packed is packed
        q = dev.start_queue(0)
        assert q.read(8, 4096, layout) == initial(peer, 8, 4096)
        data = os.urandom(8192)
        q.write(40, data, layout)
        assert image(peer, 40 * SECTOR, 8192) == data
        q.flush(layout)
        assert q.get_id(layout) == profile(peer).serial
        q.write_zeroes(40, 2, layout=layout)
        assert image(peer, 40 * SECTOR, 8192) == bytes(1024) + data[1024:]


def test_header_and_status_in_one_descriptor(blk_peer) -> None:
    """Illegal (a descriptor is readable or writable): vhostmem completes it with IOERR;
    qsd never completes it. Neither reports success, and vhostmem's queue keeps working."""
    peer = blk_peer()
    with VhostUserBlk.open(peer.socket_path) as dev:
        q = dev.start_queue(0)
        req = q.submit(BlkType.IN, 0, in_len=SECTOR, layout=Layout(single=True))
        if profile(peer).completes_malformed_chain:
            q.wait_for(req, timeout=MALFORMED_WAIT)
            assert req.status == BlkStatus.IOERR
            assert q.read(0, SECTOR) == initial(peer, 0, SECTOR)
        else:
            with pytest.raises(TimeoutError):
                q.wait_for(req, timeout=MALFORMED_WAIT)
            assert req.status != BlkStatus.OK


@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "no-event-idx"])
def test_event_idx_on_and_off(blk_peer, event_idx: bool) -> None:
    peer = blk_peer()
    with VhostUserBlk.open(peer.socket_path, event_idx=event_idx) as dev:
        assert dev.has_feature(VirtioFeature.EVENT_IDX) is event_idx
        q = dev.start_queue(0)
        assert q.ring.event_idx is event_idx
        for rounds in range(1, 4):
            reqs = [q.prepare(BlkType.IN, 8 * k, in_len=4096) for k in range(16)]
            q.notify()
            for k, req in enumerate(reqs):
                q.wait_for(req)
                assert req.status == BlkStatus.OK
                assert dev.ram.read(req.in_gpa, 4096) == initial(peer, 8 * k, 4096)
            assert q.ring.last_used == 16 * rounds
        if event_idx:  # the device announces where it wants the next kick
            assert q.ring.avail_event == q.ring.published
        else:
            assert q.ring.avail_event == 0 and q.kicks == 3


def test_read_only_export(blk_peer) -> None:
    peer = blk_peer(readonly=True)
    with VhostUserBlk.open(peer.socket_path) as dev:
        q = dev.start_queue(0)
        assert q.read(0, 4096) == initial(peer, 0, 4096)
        assert q.run(BlkType.OUT, 0, data=b"x" * 4096)[0] == BlkStatus.IOERR
        for type_ in (BlkType.WRITE_ZEROES, BlkType.DISCARD):
            status = q.run(type_, data=discard_segment(0, 8))[0]
            assert status == BlkStatus.IOERR, type_.name
        q.flush()
        assert image(peer, 0, 8192) == initial(peer, 0, 8192)


@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "no-event-idx"])
def test_packed_event_suppression(vhostmem_peer, event_idx: bool) -> None:
    """vhostmem only (qemu-storage-daemon has no packed rings): batches wrap a 32-entry packed
    ring five times; with EVENT_IDX the device's area asks for a kick at the next position
    (DESC, off_wrap), without it the idle device has kicks enabled and got one per batch."""
    peer = vhostmem_peer()
    with VhostUserBlk.open(peer.socket_path, event_idx=event_idx, packed=True) as dev:
        assert dev.packed and dev.has_feature(VirtioFeature.EVENT_IDX) is event_idx
        q = dev.start_queue(0, size=32)
        for _ in range(5):  # 10 requests of 3 descriptors each
            reqs = [q.prepare(BlkType.IN, 8 * k, in_len=4096) for k in range(10)]
            q.notify()
            for k, req in enumerate(reqs):
                q.wait_for(req)
                assert req.status == BlkStatus.OK
                assert dev.ram.read(req.in_gpa, 4096) == initial(peer, 8 * k, 4096)
        off_wrap, flags = q.ring.device_event
        if event_idx:
            assert (off_wrap, flags) == (q.ring.published, RING_EVENT_FLAGS_DESC)
        else:
            assert flags == RING_EVENT_FLAGS_ENABLE and q.kicks == 5
        assert dev.stop_queue(0) == q.ring.base()  # GET_VRING_BASE: positions and wraps


def test_packed_rings_get_a_packed_inflight_region(vhostmem_peer) -> None:
    """vhostmem only. With VIRTIO_F_RING_PACKED negotiated, GET_INFLIGHT_FD sizes the region
    for the packed layout (32 + 32 * queue_size bytes per queue, rounded up to 64, then the
    64-byte device-state trailer); a region sized for split rings is refused by
    SET_INFLIGHT_FD, naming mmap_size; the packed one is taken and the rings serve."""
    peer = vhostmem_peer()
    with VhostUserBlk.open(peer.socket_path, packed=True, inflight=True) as dev:
        assert dev.client.has_protocol(ProtocolFeature.INFLIGHT_SHMFD)
        shape = {"mmap_size": 0, "mmap_offset": 0, "num_queues": 1, "queue_size": 128}
        reply = dev.client.call(FrontendRequest.GET_INFLIGHT_FD, shape)
        assert reply is not None and reply.payload.mmap_size == 4160 + 64  # 4128 -> 4160
        os.close(reply.fds[0])
        region = os.memfd_create("inflight", os.MFD_ALLOW_SEALING)
        try:
            split_size = 2112  # the split layout's queue: 16 + 16 * 128 rounded up to 64
            os.ftruncate(region, split_size)
            fcntl.fcntl(region, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            with pytest.raises(VhostUserError, match="SET_INFLIGHT_FD"):
                dev.client.call(FrontendRequest.SET_INFLIGHT_FD,
                                dict(shape, mmap_size=split_size), [region])
        finally:
            os.close(region)
        dev.use_inflight(128)
        q = dev.start_queue(0)
        assert q.read(0, SECTOR) == initial(peer, 0, SECTOR)

"""Guest memory: SET_MEM_TABLE, ADD_MEM_REG/REM_MEM_REG at run time with I/O between, table
replacement under a running ring, buffers crossing regions, the memory-slot limit."""

from __future__ import annotations

import os

import pytest

from protocol import ProtocolFeature
from tests.conformance.profiles import MIB, SECTOR, image, initial, profile
from vhostmem.frontend.blk import STATUS_UNSET, BlkStatus, BlkType, blk_header
from vhostmem.frontend.client import VhostUserError
from vhostmem.frontend.device import SUPPORTED_PROTOCOL_FEATURES, VhostUserBlk
from vhostmem.frontend.memory import PAGE_SIZE, GuestRam, GuestRegion
from vhostmem.frontend.queue import BlkQueue
from vhostmem.frontend.ring import VIRTQ_DESC_F_WRITE

pytestmark = pytest.mark.qsd

EXTRA_GPA = 256 * MIB  # a hot-plugged region, away from boot RAM (like a DIMM)
FAR_UADDR = 0x6660_0000_0000  # made-up userspace_addr values the backend must translate
LOW_UADDR, HIGH_UADDR = 0x5550_0000_0000, 0x7770_0000_0000
DROP_WAIT = 1.0  # seconds a peer gets to complete a request it may drop
SLOT_REGION = 2 * MIB
UNMAPPED_GPA = 0x4000_0000  # 1 GiB: far beyond the 64 MiB of default guest RAM


def read_into(q: BlkQueue, ram: GuestRam, buf: int, sector: int, length: int) -> int:
    """IN request whose data buffer is `buf` (anywhere in guest RAM); returns the status."""
    hdr, status = ram.alloc(16), ram.alloc(1)
    try:
        ram.write(hdr, blk_header(BlkType.IN, sector))
        req = q.prepare_chain([(hdr, 16, 0), (buf, length, VIRTQ_DESC_F_WRITE),
                               (status, 1, VIRTQ_DESC_F_WRITE)], status_gpa=status)
        q.notify()
        return q.wait_for(req).status
    finally:
        ram.free(hdr)
        ram.free(status)


def _write_from(q: BlkQueue, ram: GuestRam, buf: int, sector: int, length: int) -> int:
    hdr, status = ram.alloc(16), ram.alloc(1)
    try:
        ram.write(hdr, blk_header(BlkType.OUT, sector))
        req = q.prepare_chain([(hdr, 16, 0), (buf, length, 0),
                               (status, 1, VIRTQ_DESC_F_WRITE)], status_gpa=status)
        q.notify()
        return q.wait_for(req).status
    finally:
        ram.free(hdr)
        ram.free(status)


def _io_in_region(peer, q: BlkQueue, ram: GuestRam, region: GuestRegion, sector: int) -> None:
    """A read and a write whose buffers live in `region`, checked against the image."""
    buf = ram.alloc(8192, region=region)
    try:
        assert read_into(q, ram, buf, sector, 8192) == BlkStatus.OK
        assert ram.read(buf, 8192) == initial(peer, sector, 8192)
        data = os.urandom(8192)
        ram.write(buf, data)
        assert _write_from(q, ram, buf, sector, 8192) == BlkStatus.OK
        assert image(peer, sector * SECTOR, 8192) == data
    finally:
        ram.free(buf)


def test_set_mem_table_with_several_regions(blk_peer) -> None:
    peer = blk_peer()
    with GuestRam() as ram:
        ram.add_region(0, 8 * MIB)
        far = ram.add_region(EXTRA_GPA, 4 * MIB, userspace_addr=FAR_UADDR, mmap_offset=PAGE_SIZE)
        with VhostUserBlk.open(peer.socket_path, ram=ram, mem="table") as dev:
            q = dev.start_queue(0, depth=8)
            _io_in_region(peer, q, ram, far, 64)
            _io_in_region(peer, q, ram, ram.regions[0], 128)


def test_add_and_remove_regions_at_run_time(blk_peer) -> None:
    """ADD_MEM_REG, I/O in the new region, REM_MEM_REG, I/O in the rest, and again."""
    peer = blk_peer()
    with VhostUserBlk.open(peer.socket_path, mem="slots") as dev:
        q = dev.start_queue(0)
        for round_ in range(2):
            extra = dev.ram.add_region(EXTRA_GPA, 4 * MIB, userspace_addr=FAR_UADDR)
            dev.add_region(extra)
            _io_in_region(peer, q, dev.ram, extra, 16 + 32 * round_)
            dev.remove_region(extra)
            dev.ram.remove_region(EXTRA_GPA)
            assert q.read(0, 4096) == initial(peer, 0, 4096)


def test_mem_table_replaced_while_ring_runs(blk_peer) -> None:
    """Without CONFIGURE_MEM_SLOTS QEMU announces a hot-plugged DIMM by a whole new
    SET_MEM_TABLE while the rings keep running; the ring must survive the remap."""
    peer = blk_peer()
    no_slots = SUPPORTED_PROTOCOL_FEATURES & ~(1 << ProtocolFeature.CONFIGURE_MEM_SLOTS)
    with VhostUserBlk.open(peer.socket_path, protocol_features=no_slots) as dev:
        assert not dev.client.has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS)
        q = dev.start_queue(0)
        assert q.read(0, 4096) == initial(peer, 0, 4096)
        extra = dev.ram.add_region(EXTRA_GPA, 4 * MIB)
        dev.send_memory("table")  # plug: old regions + the new one
        _io_in_region(peer, q, dev.ram, extra, 80)
        assert q.read(8, 4096) == initial(peer, 8, 4096)
        dev.ram.remove_region(EXTRA_GPA)
        dev.send_memory("table")  # unplug: the old regions only
        for k in range(20):  # the ring index carries on across both replacements
            assert q.read(200 + k, SECTOR) == initial(peer, 200 + k, SECTOR)
        assert dev.stop_queue(0) == q.ring.published == 24


def _crossing_ram() -> GuestRam:
    """Two gpa-contiguous regions with far-apart made-up userspace addresses, the second at
    a nonzero memfd offset: a buffer across the boundary is two host pieces."""
    ram = GuestRam()
    ram.add_region(0, 4 * MIB, userspace_addr=LOW_UADDR)
    ram.add_region(4 * MIB, 4 * MIB, userspace_addr=HIGH_UADDR, mmap_offset=PAGE_SIZE)
    return ram


@pytest.mark.parametrize("mem", ["table", "slots"])
def test_buffer_crossing_two_regions(blk_peer, mem: str) -> None:
    """Direct chains: one descriptor spans the region boundary."""
    peer = blk_peer()
    with _crossing_ram() as ram, VhostUserBlk.open(peer.socket_path, ram=ram, mem=mem) as dev:
        q = dev.start_queue(0, depth=4)
        buf = ram.reserve(4 * MIB - 3000, 8192)
        assert read_into(q, ram, buf, 24, 8192) == BlkStatus.OK
        assert ram.read(buf, 8192) == initial(peer, 24, 8192)
        new = os.urandom(8192)
        ram.write(buf, new)
        assert _write_from(q, ram, buf, 24, 8192) == BlkStatus.OK
        assert image(peer, 24 * SECTOR, 8192) == new


def test_indirect_table_with_buffer_crossing_regions(blk_peer) -> None:
    """vhostmem serves it. qsd (libvhost-user) counts host iovecs against the indirect
    table's length, reports a "looped descriptor" and drops the connection: the request is
    never completed and the control channel sees EOF; the daemon itself survives."""
    peer = blk_peer()
    with _crossing_ram() as ram, VhostUserBlk.open(peer.socket_path, ram=ram) as dev:
        q = dev.start_queue(0, depth=4)
        buf = ram.reserve(4 * MIB - 3000, 8192)
        hdr, status = ram.alloc(16), ram.alloc(1)
        ram.write(hdr, blk_header(BlkType.IN, 24))
        req = q.prepare_chain([(hdr, 16, 0), (buf, 8192, VIRTQ_DESC_F_WRITE),
                               (status, 1, VIRTQ_DESC_F_WRITE)], indirect=True,
                              status_gpa=status)
        q.notify()
        if profile(peer).serves_indirect_region_crossing:
            q.wait_for(req)
            assert req.status == BlkStatus.OK and req.used_len == 8193
            assert ram.read(buf, 8192) == initial(peer, 24, 8192)
        else:
            with pytest.raises(TimeoutError):
                q.wait_for(req, timeout=DROP_WAIT)
            with pytest.raises(VhostUserError):
                dev.client.get_features()
    assert peer.alive()
    with VhostUserBlk.open(peer.socket_path) as dev:  # the peer serves the next frontend
        assert dev.start_queue(0).read(0, SECTOR) == initial(peer, 0, SECTOR)


def test_memory_slot_limit(blk_peer) -> None:
    """Exactly GET_MAX_MEM_SLOTS regions fit; one more: vhostmem answers a failed REPLY_ACK
    and keeps serving, qsd drops the connection."""
    peer = blk_peer()
    prof = profile(peer)
    with VhostUserBlk.open(peer.socket_path, mem="slots", ram_size=SLOT_REGION) as dev:
        limit = dev.offer.max_mem_slots
        assert limit == prof.max_mem_slots
        q = dev.start_queue(0, depth=2, max_data=4096)
        regions = [dev.ram.add_region(EXTRA_GPA + k * SLOT_REGION, SLOT_REGION)
                   for k in range(limit)]
        for region in regions[:limit - 1]:
            dev.add_region(region)
        _io_in_region(peer, q, dev.ram, regions[limit - 2], 40)
        if prof.refuses_extra_slot_with_ack:
            with pytest.raises(VhostUserError, match="REPLY_ACK 1"):
                dev.add_region(regions[-1])
            _io_in_region(peer, q, dev.ram, regions[0], 64)
            assert q.read(0, SECTOR) == initial(peer, 0, SECTOR)
        else:
            # libvhost-user acks it (0), then panics and closes the connection.
            with pytest.raises(VhostUserError):
                dev.add_region(regions[-1])
                dev.client.get_features()
            assert "no free ram slots" in peer.log()
    assert peer.alive()


def test_buffer_outside_guest_memory(blk_peer) -> None:
    """vhostmem fails the request with IOERR (the status byte is the one byte written), then
    serves the next request; qsd panics and drops the connection (the daemon survives)."""
    peer = blk_peer()
    with VhostUserBlk.open(peer.socket_path) as dev:
        q = dev.start_queue(0)
        hdr, status = dev.ram.alloc(16), dev.ram.alloc(1)
        dev.ram.write(hdr, blk_header(BlkType.IN, 0))
        dev.ram.write(status, bytes([STATUS_UNSET]))
        req = q.prepare_chain([(hdr, 16, 0), (UNMAPPED_GPA, 4096, VIRTQ_DESC_F_WRITE),
                               (status, 1, VIRTQ_DESC_F_WRITE)], status_gpa=status)
        q.notify()
        if profile(peer).fails_unmapped_buffer_with_ioerr:
            q.wait_for(req, timeout=DROP_WAIT)
            assert req.used_len == 1 and req.status == BlkStatus.IOERR
            assert q.read(0, SECTOR) == initial(peer, 0, SECTOR)
        else:
            with pytest.raises(TimeoutError):
                q.wait_for(req, timeout=DROP_WAIT)
            with pytest.raises(VhostUserError):
                dev.client.get_features()
            assert "invalid address" in peer.log()
    assert peer.alive()


def test_removing_the_region_a_running_ring_lives_in(blk_peer) -> None:
    """vhostmem refuses the REM_MEM_REG and keeps the ring running. qsd accepts it and the
    next kick crashes the daemon: only the fact that nothing completes and the daemon is
    gone is asserted for it."""
    peer = blk_peer()
    with VhostUserBlk.open(peer.socket_path, mem="slots") as dev:
        q = dev.start_queue(0)
        ring_region = dev.ram.regions[0]
        if profile(peer).refuses_removing_ring_region:
            with pytest.raises(VhostUserError, match="REPLY_ACK 1"):
                dev.remove_region(ring_region)
            assert q.read(0, SECTOR) == initial(peer, 0, SECTOR)
            assert peer.alive()
        else:
            dev.remove_region(ring_region)
            req = q.submit(BlkType.IN, 0, in_len=SECTOR)
            with pytest.raises(TimeoutError):
                q.wait_for(req, timeout=DROP_WAIT)
            assert peer.proc.wait(DROP_WAIT) != 0
